"""FSDP and tensor (model) parallelism through fairseq-train on 2 GPUs, each next to the 1-GPU run it must match.

    1 GPU                          vs  --model-parallel-size 2 (2 GPUs, the same batches, split weights)
    1 GPU with --update-freq 2     vs  --ddp-backend fully_sharded --checkpoint-activations on 2 GPUs
                                       (each GPU one of the 2 batches; one FSDP unit per block)
    with --bf16: 1 GPU --bf16-autocast  vs  --model-parallel-size 2 --bf16-autocast (fp32 weights and Adam
                                       states, bf16 matmuls; fairseq 0.12's own --bf16 is its TPU mode),
                 and 1 GPU --bf16-autocast --update-freq 2  vs  FSDP --checkpoint-activations --bf16-autocast

fairseq gives the 2 data-parallel workers batches b0, b1 for the first update, exactly what one worker with
--update-freq 2 accumulates, so the curves agree up to floating-point reduction order (fp32 training).
Each worker is started by this script (tcp rendezvous, --distributed-no-spawn): fairseq's own spawn would not
import the plugin before its distributed init, and the plugin must map fairseq's Megatron import first.

    python benchmarks/multi_gpu.py                 # 2 GPUs; loss curves side by side; logs under $OUT
    python benchmarks/multi_gpu.py --cpu --updates 3 --arch transnormer_llm_tiny    # the same on CPU (gloo)
"""
import argparse
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(workdir, n_train=4000, n_valid=200, vocab=500, seed=0):
    """Synthetic text with structure to learn (each sentence walks the vocabulary with a fixed stride)."""
    rng = random.Random(seed)
    for name, n in (("train", n_train), ("valid", n_valid)):
        with open(os.path.join(workdir, f"{name}.txt"), "w") as f:
            for _ in range(n):
                start, stride = rng.randrange(vocab), rng.choice((1, 3, 7))
                f.write(" ".join(f"w{(start + stride * j) % vocab}" for j in range(rng.randint(8, 64))) + "\n")
    data = os.path.join(workdir, "data-bin")
    subprocess.run(["fairseq-preprocess", "--only-source", "--trainpref", f"{workdir}/train.txt",
                    "--validpref", f"{workdir}/valid.txt", "--destdir", data, "--workers", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    return data


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(name, data, args, world, extra, logdir):
    """Run fairseq-train on ``world`` workers; returns {update: loss} from its per-update log lines."""
    base = ["fairseq-train", data, "--user-dir", os.path.join(REPO, "tnllm_plugin"), "--task", "language_modeling",
            "--arch", args.arch, "--criterion", "transnormer_llm_cross_entropy",
            "--tokens-per-sample", str(args.tokens_per_sample), "--max-tokens", str(args.max_tokens),
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr), "--clip-norm", "1.0",
            "--max-update", str(args.updates), "--seed", "1", "--no-save", "--disable-validation",
            "--log-format", "simple", "--log-interval", "1", "--num-workers", "0", "--required-batch-size-multiple", "1"]
    if args.cpu:
        base += ["--cpu", "--distributed-backend", "gloo"]
    base += extra
    logs = [os.path.join(logdir, f"{name}.rank{r}.log") for r in range(world)]
    if world == 1:     # explicitly: fairseq otherwise defaults to every visible GPU
        cmds = [base + ["--distributed-world-size", "1"]]
    else:
        port = free_port()
        cmds = [base + ["--distributed-world-size", str(world), "--distributed-rank", str(r), "--device-id", str(r),
                        "--distributed-no-spawn", "--distributed-init-method", f"tcp://127.0.0.1:{port}"]
                for r in range(world)]
    print(f"[{name}] " + " ".join(cmds[0]), flush=True)
    procs = [subprocess.Popen(c, stdout=open(log, "w"), stderr=subprocess.STDOUT) for c, log in zip(cmds, logs)]
    codes = [p.wait() for p in procs]
    losses = {}
    for line in open(logs[0]):
        m = re.search(r"\| train_inner \|.* loss=([\d.]+).* num_updates=(\d+)", line)
        if m:
            losses[int(m.group(2))] = float(m.group(1))
    if any(codes) or not losses:     # the other runs still go ahead; the table says which one failed
        tail = "".join(open(logs[0]).readlines()[-15:])
        print(f"[{name}] FAILED (exit codes {codes}); end of {logs[0]}:\n{tail}", flush=True)
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="transnormer_llm_385m")
    ap.add_argument("--updates", type=int, default=30)
    ap.add_argument("--tokens-per-sample", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU (a check of the script, tiny sizes)")
    ap.add_argument("--tolerance", type=float, default=2e-3, help="largest |loss difference| that counts as a match")
    ap.add_argument("--bf16", action="store_true",
                    help="also 1 GPU vs MP2 and 1 GPU vs FSDP with --bf16-autocast (expect bf16-sized gaps)")
    ap.add_argument("--only-bf16", action="store_true", help="only the --bf16 pairs")
    args = ap.parse_args()
    args.bf16 = args.bf16 or args.only_bf16
    if args.cpu and args.bf16:
        sys.exit("--bf16-autocast is a CUDA option")
    if args.cpu:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    else:
        import torch
        if torch.cuda.device_count() < 2:
            sys.exit(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    out = os.environ.get("OUT") or tempfile.mkdtemp(prefix="tnllm_multi_gpu_")
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="tnllm_corpus_")
    data = make_corpus(work)
    runs, pairs = {}, []
    if not args.only_bf16:
        runs["1gpu"] = train("1gpu", data, args, 1, [], out)
        runs["mp2"] = train("mp2", data, args, 2, ["--model-parallel-size", "2"], out)
        pairs.append(("1gpu", "mp2"))
    if not args.cpu and not args.only_bf16:     # fairscale's FSDP needs CUDA; per-block activation checkpointing must not change it
        runs["1gpu_uf2"] = train("1gpu_uf2", data, args, 1, ["--update-freq", "2"], out)
        runs["fsdp2"] = train("fsdp2", data, args, 2, ["--ddp-backend", "fully_sharded", "--checkpoint-activations"],
                              out)
        pairs.append(("1gpu_uf2", "fsdp2"))
    if args.bf16:        # bf16 autocast over fp32 weights (fairseq 0.12's --bf16 is its TPU mode)
        runs["1gpu_bf16"] = train("1gpu_bf16", data, args, 1, ["--bf16-autocast"], out)
        runs["mp2_bf16"] = train("mp2_bf16", data, args, 2, ["--bf16-autocast", "--model-parallel-size", "2"], out)
        pairs.append(("1gpu_bf16", "mp2_bf16"))
        if not args.cpu:    # the paper's recipe: FSDP, per-block activation checkpointing and bf16 together
            runs["1gpu_uf2_bf16"] = train("1gpu_uf2_bf16", data, args, 1, ["--bf16-autocast", "--update-freq", "2"],
                                          out)
            runs["fsdp2_bf16"] = train("fsdp2_bf16", data, args, 2, ["--bf16-autocast", "--ddp-backend",
                                       "fully_sharded", "--checkpoint-activations"], out)
            pairs.append(("1gpu_uf2_bf16", "fsdp2_bf16"))
    shutil.rmtree(work, ignore_errors=True)
    lines = ["| update | " + " | ".join(runs) + " | " + " | ".join(f"{b} - {a}" for a, b in pairs) + " |",
             "|---|" + "---|" * (len(runs) + len(pairs))]
    failed = [r for r, losses in runs.items() if not losses]
    worst = {p: (float("inf") if {p[0], p[1]} & set(failed) else 0.0) for p in pairs}
    first = next(iter(runs))
    for u in sorted(set().union(*(set(v) for v in runs.values()))):
        row = [runs[r].get(u, float("nan")) for r in runs]
        diffs = []
        for a, b in pairs:
            d = runs[b].get(u, float("nan")) - runs[a].get(u, float("nan"))
            worst[(a, b)] = max(worst[(a, b)], abs(d)) if d == d else float("inf")
            diffs.append(f"{d:+.4f}")
        lines.append(f"| {u} | " + " | ".join(f"{x:.4f}" for x in row) + " | " + " | ".join(diffs) + " |")
    lines.append("")
    for (a, b), w in worst.items():
        tolerance = args.tolerance if "bf16" not in b else 10 * args.tolerance    # bf16 rounding differs by layout
        verdict = "FAILED RUN" if {a, b} & set(failed) else ("MATCH" if w <= tolerance else "MISMATCH")
        lines.append(f"{b} vs {a}: largest |loss difference| {w:.2e} over {len(runs[first])} updates "
                     f"(tolerance {tolerance:.0e}): {verdict}")
    report = "\n".join(lines)
    print("\n" + report)
    with open(os.path.join(out, "multi_gpu.md"), "w") as f:
        f.write(report + "\n")
    print(f"logs in {out}")
    if failed:
        sys.exit(f"failed runs: {failed}")


if __name__ == "__main__":
    main()
