"""Sweep the decode kernels' tiles inside the 385M model's CUDA-graph decode step itself: per batch size, each layer
kind's tiles (the four GEMVs of tnllm_kernels.decode_linear: qkvu, out_proj, sglu, l3; the token mixer's step kernel
of tnllm_kernels.gla_decode without LRPE) are moved from today's along one coordinate at a time (BLOCK_N, BLOCK_K,
warps, split_k, pipeline stages; BLOCK_V and warps for the step), the whole decode step timed with each, in two
rounds (the second in reverse order) with today's tiles timed between layer kinds; then the winners are added one
at a time, best first, each kept only where the step with it beats the step without it, timed side by side.

Why here and not kernel by kernel (decode_linear_tiles.py, decode_step_tiles.py): in a decode step each kernel
launches with programmatic dependent launch while the one before still runs, so a kernel's registers, shared
memory and program count decide how much of the next one's weights stream in early. Tiles that tie when a kernel
repeats alone differ by 30-55 us a token at batch 16 inside the step (twelfth session, benchmarks/RESULTS.md).

Times: "device" is per token over 32 back-to-back graph replays (CUDA events; no host gap), "wall" the median of
single replays each followed by a synchronize, as benchmarks/decode.py times its per-token column. Choices go by
device time. The step's outputs are not checked here: the tiles only reorder fp32 sums, and the kernels' tests
check every tile form against the composition.

    source benchmarks/device_env.sh && python3 benchmarks/decode_tiles_in_step.py [--batches 16] [--budget-s 300]
writes $OUT/decode_tiles_in_step.md (and .json) when OUT is set.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmark_common import report_sweep  # noqa: E402
import decode as D  # noqa: E402

HEADS, HEAD_DIM = D.FULL["heads"], D.FULL["dim"] // D.FULL["heads"]
# the 385M block's GEMVs, (N, K, SGLU pair) -> name
DIM, FFN = D.FULL["dim"], D.FULL["ffn"]
GEMVS = {(4 * DIM, DIM, False): "qkvu", (DIM, DIM, False): "out_proj", (FFN, DIM, True): "sglu",
         (DIM, FFN, False): "l3"}
LAYER_K = {name: k for (_, k, _), name in GEMVS.items()}
MIN_GAIN_MS = 0.003       # a layer's winner enters the combination only if it beat today's by this much


class Tiles:
    """The kernels' tile functions, replaced by ones that answer from ``override`` ({layer name: tiles}) for the
    385M shapes and from the kernels' own rules otherwise."""

    def __init__(self):
        from tnllm_kernels.decode_linear import triton_gemv
        from tnllm_kernels.gla_decode import triton_step
        self.gemv_module, self.step_module = triton_gemv, triton_step
        self.gemv_rule, self.step_rule = triton_gemv._tiles, triton_step._step_tiles
        self.override = {}
        triton_gemv._tiles, triton_step._step_tiles = self._gemv, self._step

    def restore(self):
        self.gemv_module._tiles, self.step_module._step_tiles = self.gemv_rule, self.step_rule

    def _gemv(self, m, n, k, glu):
        t = self.override.get(GEMVS.get((n, k, glu)))
        return tuple(t) if t is not None else self.gemv_rule(m, n, k, glu)

    def _step(self, rows_heads, head_dim, lrpe):
        t = None if lrpe else self.override.get("step")
        return tuple(t) if t is not None else self.step_rule(rows_heads, head_dim, lrpe)

    def today(self, batch):
        t = {name: self.gemv_rule(batch, n, k, glu) for (n, k, glu), name in GEMVS.items()}
        t["step"] = self.step_rule(batch * HEADS, HEAD_DIM, False)
        return t


def neighbours(name, tiles, k=None):
    """Tiles that differ from ``tiles`` in one coordinate, over that coordinate's range: a GEMV's BLOCK_N 16-64 (1-64
    for the broadcast form), BLOCK_K 64 to K's power of two, 2-8 warps, split_k 1-8, pipeline stages 2 and 4 (against
    Triton's 3; tl.dot form); the step's BLOCK_V 16 to the head dim, 1-8 warps."""
    def powers(lo, hi):
        return [1 << i for i in range(lo.bit_length() - 1, hi.bit_length())]
    if name == "step":
        bv, w = tiles
        return [(v, w) for v in powers(16, HEAD_DIM) if v != bv] + [(bv, x) for x in powers(1, 8) if x != w]
    bm, bn, bk, w, dot = tiles[:5]
    split = tiles[5] if len(tiles) > 5 else 1
    now = [bm, bn, bk, w, dot, split]
    axes = ((1, powers(16 if dot else 1, 64)), (2, powers(64, min(1 << (k - 1).bit_length(), 1024 if dot else 2048))),
            (3, powers(2, 8)), (5, powers(1, 8)))
    out = []
    for i, values in axes:
        for v in values:
            t = list(now)
            t[i] = v
            # the broadcast form holds BLOCK_M x BLOCK_N x BLOCK_K products (two with SGLU) in registers: at most 256
            # a thread (the kernel sweep's limit was 128)
            if v != now[i] and (dot or t[0] * t[1] * t[2] * (2 if name == "sglu" else 1) <= 256 * 32 * t[3]):
                out.append(tuple(t))
    if dot:
        out += [tuple(now) + (2,), tuple(now) + (4,)]
    return out


def measure(runner, graph, state, tok, steps=32, reps=3):
    """(device ms, wall ms) per token of a fresh graph decoder (captured with the tiles in force)."""
    with torch.no_grad():
        dec = graph(runner.model, D.with_positions(state, tok.device))
        for _ in range(4):
            tok = dec(tok).argmax(-1)
        walls, devices = [], []
        for _ in range(reps):
            walls += [D.timed(lambda: dec(tok), tok.device)[1] for _ in range(steps // 4)]
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                dec.graph.replay()
            end.record()
            torch.cuda.synchronize()
            devices.append(start.elapsed_time(end) / steps)
    return statistics.median(devices), statistics.median(walls)


def sweep(batch, tiles, budget_s, rounds=2):
    """The sweep at one batch size; returns (report lines, results)."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    device = torch.device("cuda")
    runner = D.Ours(D.FULL, device, torch.bfloat16)
    graph, _ = D.graph_decoder(device)
    with torch.no_grad():
        state, logits = runner.prefill(D.make_prompt(D.FULL, batch, 1024, device))
    tok = logits.argmax(-1)
    today = tiles.today(batch)
    timed = []

    def run(label, override):
        tiles.override = dict(override)
        try:
            dev, wall = measure(runner, graph, state, tok)
        except Exception as e:      # OutOfResources (tiles too big for the GPU), or a tile form the kernel refuses
            timed.append(dict(label=label, tiles=dict(override), error=f"{type(e).__name__}: {str(e)[:160]}"))
            print(f"batch {batch} {label}: {type(e).__name__} {override}", flush=True)
            return None
        timed.append(dict(label=label, tiles=dict(override), device_ms=dev, wall_ms=wall))
        print(f"batch {batch} {label}: device {dev:.3f} ms, wall {wall:.3f} ms  {override}", flush=True)
        return dev

    base = [run("today", {})]
    by_layer = {}
    for r in range(rounds):
        for name in today:
            cands = neighbours(name, today[name], LAYER_K.get(name))
            for t in (cands if r == 0 else cands[::-1]):
                if time.perf_counter() - t0 > budget_s * 0.7:
                    break
                dev = run(f"round {r + 1} {name}", {name: t})
                if dev is not None:
                    by_layer.setdefault(name, {}).setdefault(t, []).append(dev)
            base.append(run(f"today, after {name}", {}))
    today_ms = statistics.median(b for b in base if b is not None)
    winners = []
    for name, by in by_layer.items():
        t, devs = min(by.items(), key=lambda kv: statistics.mean(kv[1]))
        if today_ms - statistics.mean(devs) >= MIN_GAIN_MS:
            winners.append((statistics.mean(devs), name, t))
    chosen = {}
    for _, name, t in sorted(winners):
        with_it, without = [], []
        for _ in range(2):
            with_it.append(run(f"combine: + {name}", {**chosen, name: t}))
            without.append(run("combine: without", chosen))
        if None not in with_it + without and statistics.mean(with_it) < statistics.mean(without) - MIN_GAIN_MS / 2:
            chosen[name] = t
    final = [run("chosen", chosen) for _ in range(2)] if chosen else []
    lines = [f"**batch {batch}** (prompt 1024): today's tiles {today}; device ms per token today "
             f"{today_ms:.3f} (median of {len(base)})", "",
             "| layer | tiles | device ms (each round) | vs today us |", "|---|---|---|---|"]
    for name, by in by_layer.items():
        for t, devs in sorted(by.items(), key=lambda kv: statistics.mean(kv[1])):
            lines.append(f"| {name} | {t} | {' / '.join(f'{d:.3f}' for d in devs)} | "
                         f"{(statistics.mean(devs) - today_ms) * 1e3:+.1f} |")
    lines += ["", f"chosen (each kept where the step with it beat the step without it): {chosen or 'today'}"]
    if final:
        lines.append(f"device ms per token with the chosen tiles: {' / '.join(f'{d:.3f}' for d in final)} against "
                     f"{today_ms:.3f} today")
    tiles.override = {}
    return lines, dict(batch=batch, today={k: list(v) for k, v in today.items()}, today_ms=today_ms,
                       chosen={k: list(v) for k, v in chosen.items()}, timed=timed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="16", help="comma-separated batch sizes")
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds per batch size (rounds stop at 70%%)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_tiles_in_step.py times the CUDA-graph decoder: it needs a CUDA device")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        sys.exit(f"--batches takes comma-separated integers, got {args.batches!r}")
    tiles = Tiles()
    lines, results = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, 385M preset", ""], []
    for b in batches:
        part, r = sweep(b, tiles, args.budget_s)
        lines += part + [""]
        results.append(r)
    report_sweep("decode_tiles_in_step", lines, results)


if __name__ == "__main__":
    main()
