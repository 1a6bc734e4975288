"""The main job, end to end on CPU through the real host (fairseq):

  1. corpus: the Python standard library's source files (present on every machine), or --text FILE_OR_DIR
  2. a sentencepiece BPE tokenizer trained on it; train / valid / test encoded and binarized
     (fairseq-preprocess)
  3. fairseq-train --user-dir tnllm_plugin --arch transnormer_llm_tiny for a few minutes, with progress
  4. validation perplexity on the test split (fairseq-eval-lm)
  5. a continuation of a prompt through fairseq's sequence generator (incremental decoding on the
     recurrent state; it ends at the end of the line, as fairseq's language-model data ends lines with </s>),
     then several lines with tnllm_plugin.generation on the same checkpoint (</s> read as a newline)

    bash examples/quickstart.sh [--minutes 4] [--text my_corpus.txt] [--work-dir work_dirs/quickstart]
"""
import argparse
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", help="a text file or a directory of .txt/.py files (default: the Python stdlib)")
    p.add_argument("--max-bytes", type=int, default=3_000_000, help="corpus size taken from --text/stdlib")
    p.add_argument("--work-dir", default="work_dirs/quickstart")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--arch", default="transnormer_llm_tiny")
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    p.add_argument("--max-update", type=int, default=0, help="stop after this many updates (0: time only)")
    p.add_argument("--tokens-per-sample", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--prompt", default="def read_file(path):")
    p.add_argument("--gen-len", type=int, default=60)
    return p.parse_args()


def corpus_files(text):
    if text is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in root.glob("*.py"))          # top level only: deterministic, a few MB
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".py", ".md"))
        if files:
            return files
    sys.exit(f"--text {text}: no such file, or a directory without .txt/.py/.md files")


def write_splits(files, max_bytes, out: Path):
    """Whole files go to train / valid / test (18:1:1 by position), up to max_bytes in all."""
    lines_by_split = {"train": [], "valid": [], "test": []}
    total = 0
    for i, f in enumerate(files):
        text = f.read_text(encoding="utf-8", errors="replace")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        split = "valid" if i % 20 == 18 else "test" if i % 20 == 19 else "train"
        lines_by_split[split] += lines
        total += len(text)
        if total >= max_bytes:
            break
    if len(files) == 1:      # one file: split its lines instead
        lines = lines_by_split["train"]
        k = max(1, len(lines) // 20)
        lines_by_split = {"train": lines[:-2 * k], "valid": lines[-2 * k:-k], "test": lines[-k:]}
    for split, lines in lines_by_split.items():
        if not lines:
            sys.exit(f"the corpus is too small: the {split} split is empty")
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"[quickstart] corpus: {total / 1e6:.1f} MB from {len(files)} file(s) -> {out}", flush=True)


def run(cmd):
    print("[quickstart] $ " + " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True)


def main():
    args = parse_args()
    work = Path(args.work_dir).resolve()
    raw, bpe_dir, data_bin, ckpt = work / "raw", work / "bpe", work / "data-bin", work / "checkpoints"
    for d in (raw, bpe_dir, ckpt):
        d.mkdir(parents=True, exist_ok=True)
    write_splits(corpus_files(args.text), args.max_bytes, raw)

    import sentencepiece as spm
    spm_prefix = work / "spm"
    spm.SentencePieceTrainer.train(input=str(raw / "train.txt"), model_prefix=str(spm_prefix),
                                   vocab_size=args.vocab_size, model_type="bpe", character_coverage=1.0,
                                   byte_fallback=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{spm_prefix}.model")
    for split in ("train", "valid", "test"):
        with open(raw / f"{split}.txt", encoding="utf-8") as src, open(bpe_dir / f"{split}.bpe", "w") as dst:
            for line in src:
                dst.write(" ".join(sp.encode(line.rstrip("\n"), out_type=str)) + "\n")
    print(f"[quickstart] sentencepiece BPE, {args.vocab_size} pieces: {spm_prefix}.model", flush=True)

    run(["fairseq-preprocess", "--only-source", "--trainpref", bpe_dir / "train.bpe", "--validpref",
         bpe_dir / "valid.bpe", "--testpref", bpe_dir / "test.bpe", "--destdir", data_bin, "--workers", "2"])
    user_dir = REPO / "tnllm_plugin"
    train = ["fairseq-train", data_bin, "--user-dir", user_dir, "--task", "language_modeling", "--cpu",
             "--arch", args.arch, "--criterion", "transnormer_llm_cross_entropy",
             "--tokens-per-sample", args.tokens_per_sample, "--sample-break-mode", "none",
             "--max-tokens", args.max_tokens, "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
             "--lr", args.lr, "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "50",
             "--clip-norm", "1.0", "--stop-time-hours", args.minutes / 60, "--max-epoch", "1000",
             "--save-dir", ckpt, "--no-epoch-checkpoints", "--save-interval-updates", "100",
             "--keep-interval-updates", "1", "--validate-interval-updates", "100",
             "--log-format", "simple", "--log-interval", "10", "--seed", "1", "--num-workers", "0"]
    if args.max_update:
        train += ["--max-update", args.max_update]
    run(train)
    run(["fairseq-eval-lm", data_bin, "--user-dir", user_dir, "--path", ckpt / "checkpoint_last.pt", "--cpu",
         "--gen-subset", "test", "--tokens-per-sample", args.tokens_per_sample, "--max-tokens", args.max_tokens,
         "--num-workers", "0"])

    from tnllm_plugin.fairseq_adapter import TransNormerLanguageModel
    lm = TransNormerLanguageModel.from_pretrained(str(ckpt), "checkpoint_last.pt", str(data_bin),
                                                  bpe="sentencepiece", sentencepiece_model=f"{spm_prefix}.model")
    lm.eval()
    text = lm.sample(args.prompt, beam=1, sampling=True, sampling_topk=20, temperature=0.8, seed=1,
                     max_len_b=args.gen_len)
    print(f"[quickstart] prompt: {args.prompt!r}\n[quickstart] continuation (fairseq's sequence generator, "
          f"one recurrence step per token):\n{text}", flush=True)
    lines = continue_lines(ckpt / "checkpoint_last.pt", f"{spm_prefix}.model", data_bin / "dict.txt", args)
    print(f"[quickstart] continuation over several lines (tnllm_plugin.generation, same checkpoint):\n{lines}",
          flush=True)


def continue_lines(checkpoint, spm_model, dict_path, args):
    """Sample past the end of the line: fairseq's training stream separates lines with </s>, so the prompt's
    lines are joined with </s>, nothing stops at </s>, and each </s> produced is printed as a newline."""
    from tnllm_plugin.convert import load_model
    from tnllm_plugin.generation import SamplingConfig, TextCodec, generate
    model, _ = load_model(str(checkpoint))
    codec = TextCodec(str(spm_model), str(dict_path))
    ids = [codec.eos_id]
    for line in args.prompt.split("\n"):
        ids += codec.encode(line) + [codec.eos_id]
    sampling = SamplingConfig(max_new_tokens=args.gen_len, temperature=0.8, top_k=20, seed=1)
    new = generate(model.eval(), [ids[:-1]], sampling)[0]      # the prompt's last line goes on
    text, line = [args.prompt], []
    for token in new + [codec.eos_id]:
        if token == codec.eos_id:
            text.append(codec.decode(line))
            line = []
        else:
            line.append(token)
    return "".join(text[:2]) + "".join("\n" + t for t in text[2:])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
