"""Loss against the position inside the context: a diagnostic for the quality benchmark (benchmarks/quality.py).

    python benchmarks/position_loss.py --path runs/tnl/ckpt/checkpoint_last.pt,runs/llama/ckpt/checkpoint_last.pt \\
        --data DATA_BIN --split valid --max-batches 100 --json out.json

For each checkpoint: the mean cross entropy (bits per token, fairseq's base 2) of the targets at positions
[lo, hi) of the context, over the split cut into contiguous samples of --tokens-per-sample tokens (as training cut
it: --sample-break-mode none). The target at position p is predicted from p + 1 input tokens: the sample's first p
and the token before it (fairseq's input is the target shifted right by one).

Why: at the benchmark's size TransNormerLLM ends well behind the LLaMA baseline. A model whose attention works gets
better with more context, so its loss must fall with the position; and if the gap to softmax attention is a recall
gap (copying tokens from far back, which a decayed linear-attention state keeps only lossily), the gap grows with
the position. A gap already there at the first positions, where both models see almost no context, points instead
at the per-token path (embedding, norms, FFN, LM head), i.e. at a bug rather than at the attention.

Both models load the same way fairseq-validate loads them (checkpoint_utils.load_model_ensemble_and_task, the
checkpoint's own task settings, --user-dir for the models it needs), and the loss is the checkpoint's criterion with
reduce=False: exactly the per-token loss that training and validation sum."""
import argparse
import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def bucket_edges(tokens_per_sample, first=16, factor=4):
    """[0, 16, 64, 256, 1024, ..., tokens_per_sample]: log-spaced, as context use shows up as a log-like curve."""
    edges, e = [0], first
    while e < tokens_per_sample:
        edges.append(e)
        e *= factor
    return edges + [tokens_per_sample]


def load(path, data, user_dir):
    """(model, task, criterion) of one fairseq checkpoint, as fairseq-validate builds them, on the CPU, eval mode."""
    from fairseq import checkpoint_utils, utils
    utils.import_user_module(Namespace(user_dir=str(user_dir)))
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
    return models[0].eval(), task, task.build_criterion(cfg.criterion)


def batches(task, split, batch_size, max_batches=None, multiple=1):
    """The split's samples in fairseq-validate's order (seed 1): every checkpoint sees the same samples, batch_size a
    batch. multiple is fairseq's --required-batch-size-multiple: fairseq-validate's default 8 drops the last
    partial batch of the split (fairseq's batch_by_size); 1 keeps every sample."""
    task.load_dataset(split, combine=False, epoch=1)
    itr = task.get_batch_iterator(dataset=task.dataset(split), max_sentences=batch_size, seed=1, num_workers=0,
                                  required_batch_size_multiple=multiple).next_epoch_itr(shuffle=False)
    for i, sample in enumerate(itr):
        if max_batches is not None and i >= max_batches:
            return
        yield sample


@torch.no_grad()
def position_sums(model, criterion, samples, tokens_per_sample):
    """Per position p of the sample: (sum of the loss in nats, count) over the non-padding targets. The last sample
    of the split may be shorter (right-padded): its padding targets are left out, not counted as position losses."""
    total = torch.zeros(tokens_per_sample, dtype=torch.float64)
    count = torch.zeros(tokens_per_sample, dtype=torch.float64)
    from fairseq import utils
    device = next(model.parameters()).device
    for sample in samples:
        sample = utils.apply_to_sample(lambda t: t.to(device), sample)
        target = sample["target"].cpu()
        loss, _, _ = criterion(model, sample, reduce=False)     # per token, flat, padding 0
        loss = loss.reshape(target.shape).double().cpu()
        mask = target.ne(criterion.padding_idx)
        n = target.shape[1]
        total[:n] += (loss * mask).sum(0)
        count[:n] += mask.sum(0)
    return total, count


def bucketed(total, count, edges):
    """[(lo, hi, tokens, mean bits per token)] for each [lo, hi), and the overall mean (bits)."""
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        n = count[lo:hi].sum().item()
        rows.append((lo, hi, int(n), total[lo:hi].sum().item() / n / math.log(2) if n else float("nan")))
    return rows, total.sum().item() / count.sum().item() / math.log(2)


def position_losses(model, criterion, task, split, batch_size, max_batches=None, edges=None, multiple=1):
    """The core: {edges, buckets: [(lo, hi, tokens, bits)], overall: bits, per_position: [bits], samples}."""
    tps = (getattr(task, "cfg", None) or task.args).tokens_per_sample   # a checkpoint of args has no task.cfg
    edges = edges or bucket_edges(tps)
    samples = list(batches(task, split, batch_size, max_batches, multiple))
    total, count = position_sums(model, criterion, samples, tps)
    rows, overall = bucketed(total, count, edges)
    per_position = (total / count.clamp(min=1) / math.log(2)).tolist()
    return dict(tokens_per_sample=tps, edges=edges, buckets=rows, overall=overall, per_position=per_position,
                samples=sum(s["target"].shape[0] for s in samples), tokens=int(count.sum().item()))


def run_name(path: Path):
    """runs/NAME/ckpt/checkpoint_last.pt (quality.py's layout) -> NAME; else the file's stem."""
    return path.parent.parent.name if path.parent.name == "ckpt" else path.stem


def markdown(results):
    names = list(results)
    first = results[names[0]]
    head = "| positions | tokens | " + " | ".join(names) + " |"
    if len(names) == 2:
        head += f" {names[1]} minus {names[0]} |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, (lo, hi, n, _) in enumerate(first["buckets"]):
        vals = [results[k]["buckets"][i][3] for k in names]
        lines.append(f"| {lo}-{hi - 1} | {n:,} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"
                     + (f" {vals[1] - vals[0]:+.3f} |" if len(names) == 2 else ""))
    vals = [results[k]["overall"] for k in names]
    lines.append(f"| all | {first['tokens']:,} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"
                 + (f" {vals[1] - vals[0]:+.3f} |" if len(names) == 2 else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", required=True, help="comma list of fairseq checkpoints")
    ap.add_argument("--names", help="comma list of column names (default: quality.py's run names)")
    ap.add_argument("--data", required=True, help="the fairseq data-bin the checkpoints were trained on")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--user-dir", default=str(REPO / "benchmarks" / "quality_models"),
                    help="fairseq --user-dir registering the checkpoints' models (default: quality.py's, which "
                         "registers both transnormer_llm and llama_baseline)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-batches", type=int, help="the first N batches of the split (default: all of it)")
    ap.add_argument("--required-batch-size-multiple", type=int, default=1,
                    help="fairseq's option: 1 (default) scores every sample; 8 (fairseq-validate's default) drops "
                         "the split's last partial batch, and reproduces fairseq-validate's loss")
    ap.add_argument("--edges", help="comma list of bucket edges (default 0,16,64,256,... up to tokens-per-sample)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the models run (default: cuda when there is one). The checkpoint's own settings "
                         "apply: the quality runs' --bf16-autocast on CUDA, as in their training and validation")
    ap.add_argument("--json", help="write the results (with the loss at every position) here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.path.split(",")]
    names = args.names.split(",") if args.names else [run_name(p) for p in paths]
    if len(names) != len(paths):
        sys.exit(f"--names gives {len(names)} names for {len(paths)} --path checkpoints")
    edges = [int(e) for e in args.edges.split(",")] if args.edges else None
    results = {}
    for name, path in zip(names, paths):
        model, task, criterion = load(path, args.data, args.user_dir)
        model.to(args.device)
        results[name] = dict(path=str(path), **position_losses(model, criterion, task, args.split, args.batch_size,
                                                                args.max_batches, edges,
                                                                args.required_batch_size_multiple))
        print(f"{name}: {results[name]['overall']:.4f} bits over {results[name]['tokens']:,} tokens "
              f"({results[name]['samples']} samples)", file=sys.stderr, flush=True)
    if len({(r["tokens_per_sample"], r["tokens"]) for r in results.values()}) != 1:
        sys.exit("the checkpoints saw different samples (another --tokens-per-sample): not comparable")
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(split=args.split, data=str(args.data), batch_size=args.batch_size,
                                                   max_batches=args.max_batches,
                                                   required_batch_size_multiple=args.required_batch_size_multiple,
                                                   models=results), indent=1))


if __name__ == "__main__":
    main()
