"""Sweep the decode token mixer's step kernel (tnllm_kernels.gla_decode, _step_kernel) over its tiles, on the 385M
model's shape (8 heads of 128, fp32 state, bf16 activations, the state updated in place as the CUDA-graph decoder
does), without LRPE (23 of the 24 layers) and with it (layer 0, Dk = 256), at 1, 4, 8 and 16 rows, and print per
case the tiles _step_tiles chooses today, the fastest candidate and the state's read + write bandwidth, each timed
inside a CUDA graph (triton.testing.do_bench_cudagraph). Each timing cycles through copies of the state that fill
the L2 cache four times over, so that each call reads and writes its state in HBM as a decode step does (24 layers'
states, 210 MB at 16 rows); ``--state-in-l2`` times one copy, as the tenth session's sweep did (lower bounds).
Each candidate's o and state are checked against today's tiles' (the same sums in another order; a wrong one is
listed, not timed).

    source benchmarks/device_env.sh && python3 benchmarks/decode_step_tiles.py [--rows 1,4,8,16]
writes $OUT/decode_step_tiles.md (and .json) when OUT is set.
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmark_common import copies_past_l2, cycled_us, report_sweep  # noqa: E402

HEADS, HEAD_DIM = 8, 128
BLOCK_V = (8, 16, 32, 64, 128)
WARPS = (1, 2, 4, 8)


def operands(b, lrpe, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dk = 2 * HEAD_DIM if lrpe else HEAD_DIM
    qkvu = torch.randn(b, 4 * HEADS * HEAD_DIM, device="cuda", generator=g).to(torch.bfloat16)
    state = torch.randn(b, HEADS, dk, HEAD_DIM, device="cuda", generator=g) * 0.1
    slope = torch.rand(HEADS, device="cuda", generator=g) * 0.5
    positions = torch.randint(0, 4096, (b,), device="cuda", generator=g)
    theta = torch.rand(HEADS * HEAD_DIM, device="cuda", generator=g) if lrpe else None
    return qkvu, state, slope, positions, theta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,8,16", help="comma-separated row counts (batch sizes)")
    ap.add_argument("--rep-ms", type=int, default=20, help="do_bench_cudagraph's rep per variant")
    ap.add_argument("--state-in-l2", action="store_true",
                    help="time each variant on one copy of the state (it stays in L2) instead of cycling copies")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_step_tiles: needs a CUDA GPU")
    import triton
    from tnllm_kernels.gla_decode.triton_step import _step_tiles, gla_decode_step_triton

    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; the step "
             "kernel alone, in place, in a CUDA graph (median us per call); GB/s counts the fp32 state read and "
             "written once; tiles (BLOCK_V, num_warps); state "
             + ("repeated (in L2)" if args.state_in_l2 else "cycled through copies past L2 (in HBM)"), "",
             "| LRPE | rows | state MB | today's tiles | us | GB/s | best tiles | us | GB/s | next best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    results, wrong = [], []
    for lrpe, b in itertools.product((False, True), [int(r) for r in args.rows.split(",")]):
        qkvu, state, slope, positions, theta = operands(b, lrpe, seed=b + 100 * lrpe)
        state_bytes = state.numel() * 4
        n_copies = 1 if args.state_in_l2 else copies_past_l2(state_bytes)

        def step(tiles, s):
            return gla_decode_step_triton(qkvu, s, slope, positions, theta, "silu", in_place=True, tiles=tiles)

        today = _step_tiles(b * HEADS, HEAD_DIM, lrpe)
        o_ref, s_ref = step(today, state.clone())
        timed = []
        for tiles in itertools.product(BLOCK_V, WARPS):
            o, s = step(tiles, state.clone())
            err = max(((o.double() - o_ref.double()).norm() / o_ref.double().norm()).item(),
                      ((s.double() - s_ref.double()).norm() / s_ref.double().norm()).item())
            if not err <= 1e-2:
                wrong.append(f"LRPE {lrpe} {b} rows {tiles}: off today's tiles by {err:.2e}")
                continue
            # s and its copies updated in place, each call on the next copy
            states = [s] + [s.clone() for _ in range(n_copies - 1)]
            timed.append((cycled_us(lambda c: step(tiles, c), states, args.rep_ms), tiles))
        timed.sort()
        today_us = next(us for us, t in timed if t == today)
        gbs = lambda us: 2 * state_bytes / us / 1e3  # noqa: E731
        results.append(dict(lrpe=lrpe, rows=b, state_bytes=state_bytes, today=today, today_us=today_us,
                            all=[(t, us) for us, t in timed]))
        lines.append(f"| {lrpe} | {b} | {state_bytes / 1e6:.2f} | {today} | {today_us:.2f} | {gbs(today_us):.0f} | "
                     f"{timed[0][1]} | {timed[0][0]:.2f} | {gbs(timed[0][0]):.0f} | "
                     + ", ".join(f"{t} {us:.2f}" for us, t in timed[1:4]) + " |")
        print(lines[-1], flush=True)
    lines.append(f"\n{len(wrong)} candidates gave wrong outputs, not timed"
                 + (": " + "; ".join(wrong) if wrong else ""))
    report_sweep("decode_step_tiles", lines, results)


if __name__ == "__main__":
    main()
