"""The main job through the real Metaseq, end to end on CPU (run inside `source scripts/ensure_metaseq.sh`):

  1. corpus: the Python standard library's source files (present on every machine), or --text FILE_OR_DIR, as
     Metaseq's streaming_language_modeling layout (DATA/{train,valid,test}/00/corpus.jsonl, one document each)
  2. a byte-level BPE trained on the train split, with <s> <pad> </s> <unk> at ids 0-3 (what Metaseq's tasks
     require): DATA/vocab.json, DATA/merges.txt
  3. metaseq-train --user-dir tnllm_plugin --arch transnormer_llm_tiny for --max-update updates
  4. metaseq-validate on the valid and test splits
  5. a continuation of --prompt through Metaseq's own hub (metaseq.hub_utils.GeneratorInterface, the engine of
     metaseq-api-local): prefill, then one recurrence step per token

    bash examples/metaseq_quickstart.sh [--max-update 300] [--text my_corpus/] [--work-dir work_dirs/metaseq]
"""
import argparse
import json
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "tnllm_plugin"
BIN = Path(sys.executable).parent          # metaseq-train beside this interpreter (the Metaseq environment)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", help="a text file or a directory of .txt/.py/.md files (default: the Python stdlib)")
    p.add_argument("--work-dir", default="work_dirs/metaseq_quickstart")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--arch", default="transnormer_llm_tiny")
    p.add_argument("--max-update", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens-per-sample", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--prompt", default="def read_file(path):")
    p.add_argument("--gen-len", type=int, default=48)
    return p.parse_args()


def documents(text):
    if text is None:
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    else:
        path = Path(text)
        if not path.exists():
            sys.exit(f"--text {text}: no such file or directory")
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".py", ".md"))
    docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    docs = [d for d in docs if d.strip()]
    if len(docs) < 3:
        sys.exit(f"--text {text}: need at least 3 non-empty documents (one for each split), found {len(docs)}")
    return docs


def write_corpus(docs, data: Path, vocab_size: int):
    from tnllm_plugin.metaseq_data import train_bpe, write_streaming_splits
    random.Random(0).shuffle(docs)
    n = max(1, len(docs) // 20)
    splits = {"train": docs[2 * n:], "valid": docs[:n], "test": docs[n:2 * n]}
    write_streaming_splits(data, splits)
    tokenizer = train_bpe(splits["train"], data, vocab_size)
    print(f"[corpus] {', '.join(f'{k}: {len(v)} documents' for k, v in splits.items())}; "
          f"BPE of {tokenizer.get_vocab_size()} tokens in {data}", flush=True)


def run(cmd, what):
    print(f"[{what}] $ {' '.join(map(str, cmd))}", flush=True)
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"[{what}] failed ({proc.returncode}):\n{log[-4000:]}")
    return log


def records(log, kind):
    marker = f"| {kind} | "
    return [json.loads(line.split(marker, 1)[1]) for line in log.splitlines() if marker in line]


def main():
    args = parse_args()
    work = Path(args.work_dir).resolve()
    data, save = work / "data", work / "checkpoints"
    write_corpus(documents(args.text), data, args.vocab_size)
    task = ["--task", "streaming_language_modeling", "--vocab-filename", data / "vocab.json",
            "--merges-filename", data / "merges.txt", "--tokens-per-sample", args.tokens_per_sample]

    log = run([BIN / "metaseq-train", data, "--user-dir", PLUGIN, *task, "--arch", args.arch,
               "--criterion", "transnormer_llm_cross_entropy", "--cpu", "--optimizer", "adam", "--lr", args.lr,
               "--lr-scheduler", "inverse_sqrt", "--warmup-updates", 20, "--batch-size", args.batch_size,
               "--max-update", args.max_update, "--num-workers", 0, "--ddp-backend", "pytorch_ddp",
               # one checkpoint, checkpoint_last.pt, written when training ends (with --save-interval-updates
               # Metaseq writes checkpoint_N.pt and links checkpoint_last.pt to it from its asynchronous writer)
               "--save-dir", save, "--validate-interval-updates", args.max_update,
               "--log-format", "json", "--log-interval", 20], "train")
    for r in records(log, "train_inner"):
        print(f"[train] update {r['num_updates']:>5}  loss {r['loss']} bits  ppl {r['ppl']}", flush=True)
    checkpoint = save / "checkpoint_last.pt"

    log = run([BIN / "metaseq-validate", data, "--user-dir", PLUGIN, *task, "--path", checkpoint, "--cpu",
               "--batch-size", args.batch_size, "--log-format", "json", "--valid-subset", "valid,test"], "validate")
    for split in ("valid", "test"):
        for r in records(log, split):
            print(f"[validate] {split}: loss {r[f'{split}_loss']} bits, perplexity {r[f'{split}_ppl']}", flush=True)

    generate(checkpoint, data, args.prompt, args.gen_len)
    print(f"[done] checkpoint {checkpoint}; serve it with metaseq-api-local (README: Metaseq)", flush=True)


def generate(checkpoint: Path, data: Path, prompt: str, gen_len: int):
    """Greedy continuation through Metaseq's hub, configured as metaseq-api-local configures it
    (tnllm_plugin.metaseq_service builds those launch arguments)."""
    from metaseq import options
    from metaseq.dataclass.utils import convert_namespace_to_omegaconf
    from metaseq.hub_utils import GeneratorInterface

    from tnllm_plugin import metaseq_service
    settings = metaseq_service.settings({"TNLLM_SERVE_CHECKPOINT": str(checkpoint),
                                         "TNLLM_SERVE_VOCAB": str(data / "vocab.json"),
                                         "TNLLM_SERVE_MERGES": str(data / "merges.txt")})
    parser = options.get_generation_parser()
    parser.set_defaults(lr_scheduler=None, criterion=None)
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, settings["LAUNCH_ARGS"]))
    generator = GeneratorInterface(cfg)
    generator.load_model()
    out = generator.generate([generator.encode_fn(prompt)], max_tokens=[gen_len], temperature=0.0, top_p=1.0)
    print(f"[generate] {prompt!r} ->\n{prompt}{out[0][0]['text']}", flush=True)


if __name__ == "__main__":
    main()
