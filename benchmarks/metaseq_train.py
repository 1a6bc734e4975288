"""TransNormerLLM trained by the real `metaseq-train` on one GPU, on real text: tokens/s, peak memory, loss curve.

    # here (CPU, with the corpus of scripts/prepare_corpus.py): a slice of its Metaseq layout and a byte-level
    # BPE trained on that slice, packed to travel (Metaseq's streaming task tokenizes jsonl with such a BPE)
    python benchmarks/metaseq_train.py prepare --corpus work_dirs/corpus/metaseq --pack .whl/metaseq_linux.tar.xz

    # on the GPU machine (after `source scripts/ensure_metaseq.sh`, see benchmarks/fetch_device_wheels.sh)
    python benchmarks/metaseq_train.py run --pack .whl/metaseq_linux.tar.xz --runs 385m,7b

Each run is one `metaseq-train --user-dir tnllm_plugin` command (printed and logged); its per-update JSON log
lines give tokens/s (wps, median over the updates after --warmup), peak memory (Metaseq's cuda_gb_allocated,
torch.cuda.max_memory_allocated in GiB) and the loss. Results: $OUT/metaseq_train.{md,json} and each run's log.
"""
import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Paper Tables 12/13 setting for 7B (batch 2 per GPU, context 2048) and the plugin's training-step benchmark
# setting for 385M (benchmarks/train_throughput.py: 16384 tokens per step, vocabulary 64000). Both: FSDP units per
# block, bf16 compute over fp32 master weights (Metaseq's --fp16 --bf16 under FSDP), fp32 loss.
RUNS = {
    "7b": dict(arch="transnormer_llm_7b", batch=2, checkpoint_activations=True),
    "385m": dict(arch="transnormer_llm_385m", batch=8, checkpoint_activations=False),
    "385m_ckpt": dict(arch="transnormer_llm_385m", batch=8, checkpoint_activations=True),
    # without FSDP: Metaseq's FP16Optimizer (bf16 weights in the model, fp32 master copy)
    "385m_ddp": dict(arch="transnormer_llm_385m", batch=8, checkpoint_activations=False, ddp="pytorch_ddp"),
    "7b_batch4": dict(arch="transnormer_llm_7b", batch=4, checkpoint_activations=True),
    # bf16 copies of the weights kept from forward to backward (one GPU: nothing to gather back)
    "7b_keep": dict(arch="transnormer_llm_7b", batch=2, checkpoint_activations=True,
                    extra=["--no-reshard-after-forward"]),
}
VOCAB = 64000           # the released checkpoints' vocabulary; the BPE's 32000 pieces padded by Metaseq's task
SEQ = 2048


def prepare(args):
    """A slice of the corpus (the first --train-mib of train documents, which prepare_corpus.py already ordered
    by a hash of their path; valid whole), a byte-level BPE of --bpe-vocab pieces trained on that slice with
    <s> <pad> </s> <unk> at ids 0-3 (what Metaseq's tasks require), packed with xz."""
    sys.path.insert(0, str(REPO))
    from tnllm_plugin.metaseq_data import train_bpe
    corpus, work = Path(args.corpus), Path(tempfile.mkdtemp()) / "metaseq_linux"
    (work / "train" / "00").mkdir(parents=True, exist_ok=True)
    (work / "valid" / "00").mkdir(parents=True, exist_ok=True)
    budget, texts = args.train_mib << 20, []
    with open(corpus / "train" / "00" / "linux.jsonl", encoding="utf-8") as src, \
            open(work / "train" / "00" / "linux.jsonl", "w", encoding="utf-8") as dst:
        for line in src:
            if budget <= 0:
                break
            dst.write(line)
            budget -= len(line)
            texts.append(json.loads(line)["text"])
    (work / "valid" / "00" / "linux.jsonl").write_bytes((corpus / "valid" / "00" / "linux.jsonl").read_bytes())
    train_bpe(texts, work, args.bpe_vocab)
    with tarfile.open(args.pack, "w:xz") as tar:
        tar.add(work, arcname="metaseq_linux")
    shutil.rmtree(work.parent)
    print(f"{args.pack}: {os.path.getsize(args.pack) / 2**20:.1f} MiB ({len(texts)} train documents)")


def metaseq_command(data: Path, run: str, updates: int, save_dir: Path, log_interval: int, optimizer: str):
    spec = RUNS[run]
    # torchrun (of this interpreter, which has Metaseq), also for one GPU: Metaseq wraps the whole model in FSDP
    # with its data-parallel group, which exists only once torch.distributed is initialised (plain metaseq-train
    # on one GPU passes None and stops)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29511",
           shutil.which("metaseq-train") or "metaseq-train", str(data), "--user-dir", str(REPO / "tnllm_plugin"),
           "--task", "streaming_language_modeling", "--vocab-filename", str(data / "vocab.json"),
           "--merges-filename", str(data / "merges.txt"), "--final-vocab-size", str(VOCAB),
           "--arch", spec["arch"], "--criterion", "transnormer_llm_cross_entropy",
           "--ddp-backend", spec.get("ddp", "fully_sharded"), "--fp16", "--bf16",
           "--tokens-per-sample", str(SEQ), "--batch-size", str(spec["batch"]),
           "--optimizer", optimizer, "--adam-betas", "(0.9, 0.95)", "--weight-decay", "0.1", "--clip-norm", "1.0",
           "--lr", "3e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
           "--max-update", str(updates), "--log-format", "json", "--log-interval", str(log_interval),
           "--disable-validation", "--save-dir", str(save_dir), "--num-workers", "2", "--seed", "1",
           # no checkpoint: Metaseq's flag for a True default turns it off; sharded state skips gathering the
           # whole optimizer state onto one rank at the end, which Metaseq does before deciding not to save
           "--save-last-checkpoint", "--use-sharded-state"]
    if spec["checkpoint_activations"]:
        cmd.append("--checkpoint-activations")
    return cmd + spec.get("extra", [])


def parse_log(text: str):
    """The per-update records of Metaseq's json log format (lines "| train_inner | {...}")."""
    rows = []
    for line in text.splitlines():
        if "| train_inner |" in line:
            rows.append(json.loads(line.split("| train_inner |", 1)[1]))
    return rows


def run(args):
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    with tarfile.open(args.pack) as tar:
        tar.extractall(work, filter="data")
    data = work / "metaseq_linux"
    results = []
    for name in args.runs.split(","):
        cmd = metaseq_command(data, name, args.updates, work / f"ckpt_{name}", args.log_interval, args.optimizer)
        print("$", shlex.join(cmd), flush=True)
        start = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            log, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            log, rc = (e.stdout or b"").decode() + (e.stderr or b"").decode(), "timeout"
        (out / f"metaseq_train_{name}.log").write_text(log)
        rows = parse_log(log)
        timed = rows[args.warmup:]
        losses = [float(r["loss"]) for r in rows]
        result = dict(run=name, arch=RUNS[name]["arch"], optimizer=args.optimizer, rc=rc,
                      wall_s=round(time.time() - start, 1),
                      updates=len(rows), batch=RUNS[name]["batch"], seq=SEQ,
                      checkpoint_activations=RUNS[name]["checkpoint_activations"],
                      tokens_per_s=statistics.median(float(r["wps"]) for r in timed) if timed else None,
                      peak_gib=max((float(r.get("cuda_gb_allocated", 0)) for r in rows), default=None),
                      losses=losses, finite=all(math.isfinite(x) for x in losses), command=shlex.join(cmd))
        if rc != 0:
            result["log_tail"] = log[-3000:]
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("command", "log_tail")}), flush=True)
        if rc != 0:
            print(log[-3000:], flush=True)
    (out / "metaseq_train.json").write_text(json.dumps(results, indent=1))
    lines = ["| run | arch | updates | tokens/s (median) | peak GiB | loss first -> last | finite | rc |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        loss = f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}" if r["losses"] else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        lines.append(f"| {r['run']} | {r['arch']} | {r['updates']} | {tps} | {r['peak_gib']} | {loss} | "
                     f"{r['finite']} | {r['rc']} |")
    (out / "metaseq_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--corpus", required=True, help="the metaseq/ folder of scripts/prepare_corpus.py build")
    p.add_argument("--pack", required=True)
    p.add_argument("--train-mib", type=int, default=40)
    p.add_argument("--bpe-vocab", type=int, default=32000)
    r = sub.add_parser("run")
    r.add_argument("--pack", required=True)
    r.add_argument("--runs", default="385m,7b", help=f"comma list of {sorted(RUNS)}")
    r.add_argument("--updates", type=int, default=30)
    r.add_argument("--warmup", type=int, default=5, help="log records left out of the tokens/s median")
    r.add_argument("--optimizer", default="adam",
                   help="adam (Metaseq's; unfused without apex) or torch_adamw (the plugin's, fused)")
    r.add_argument("--log-interval", type=int, default=1,
                   help="updates per log record (Metaseq computes per-layer gradient norms for each record)")
    r.add_argument("--timeout", type=int, default=300, help="seconds per run")
    r.add_argument("--work", default="/tmp/metaseq_train")
    args = ap.parse_args(argv)
    {"prepare": prepare, "run": run}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
