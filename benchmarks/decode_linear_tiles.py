"""Sweep the decode GEMV kernel's tiles (tnllm_kernels.decode_linear) on the 385M model's four linear layers of a
block, in bf16, at 1, 4, 8 and 16 rows, and print, per layer and row count, the fastest tiles of each form of the
product (broadcast fp32 sums; tl.dot on tensor cores, from 5 rows), the tiles the kernel chooses today (_tiles) and
the composition the model runs without it (cuBLAS plus the norm/gate/product/add kernels around it), each timed
inside a CUDA graph (triton.testing.do_bench_cudagraph), as a decode step runs. Each timing cycles through copies of
the layer's weights that fill the L2 cache four times over, so that every call reads its weights from HBM as in a
decode step (24 layers, 0.67 GB); ``--weights-in-l2`` times one copy, as the sweeps before the eleventh session did
(a 2-8 MB layer repeated stays in the H200's 50 MB L2: faster than in a decode, and favouring other tiles).

Its sweeps chose _tiles's table. Each candidate's output is checked against the composition too (a wrong one
is listed, not timed). Run it again after a change to the kernel. Compiling the ~1000 variants
of 8 and 16 rows takes minutes in one process, so --jobs processes compile them first (into Triton's cache),
then this one times them. Candidates that do not fit the GPU (OutOfResources: tl.dot's widest tiles, staged through
shared memory) are listed and skipped.

    source benchmarks/device_env.sh && python3 benchmarks/decode_linear_tiles.py [--jobs 12] [--rows 1,4,8,16]
writes $OUT/decode_linear_tiles.md (and .json) when OUT is set.
"""
import argparse
import itertools
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tnllm_kernels.decode_linear import decode_linear_reference  # noqa: E402
from benchmark_common import copies_past_l2, cycled_us, report_sweep  # noqa: E402

# the 385M block: (layer, N, K, what the kernel folds in)
LAYERS = [("qkvu", 4096, 1024, dict(norm=True)), ("out_proj", 1024, 1024, dict(norm=True, gate=True, residual=True)),
          ("sglu_pair", 2816, 1024, dict(norm=True, glu=True)), ("l3", 1024, 2816, dict(residual=True))]
BLOCK_N = (2, 4, 8, 16, 32)
BLOCK_K = (128, 256, 512, 1024, 2048)
WARPS = (2, 4, 8)
DOT_BLOCK_N = (16, 32, 64)
DOT_BLOCK_K = (128, 256, 512, 1024)
MIN_PROGRAMS = 32
SPLIT_K = (2, 4, 8)         # K over that many programs: for tiles of fewer than SPLIT_BELOW column tiles
SPLIT_BELOW = 264           # two programs for each of an H200's 132 SMs


def candidates(m, n, k, glu):
    """Tiles worth timing, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, dot[, split_k]) as decode_linear_triton takes them,
    at least MIN_PROGRAMS programs, BLOCK_K no wider than K's power of two (at least 128): the broadcast product
    [BLOCK_M, BLOCK_N, BLOCK_K] (two with GLU) at 8 to 128 fp32 values a thread; from DOT_FROM_ROWS rows also
    tl.dot's, rows padded to 16. Tiles of fewer than SPLIT_BELOW column tiles also with K split over SPLIT_K
    programs, where K has that many BLOCK_K tiles."""
    import triton
    from tnllm_kernels.decode_linear.triton_gemv import DOT_FROM_ROWS      # _tiles's switch to tl.dot
    bm = max(1, triton.next_power_of_2(m))
    k_max = max(128, triton.next_power_of_2(k))
    out = []
    for bn, bk, w in itertools.product(BLOCK_N, BLOCK_K, WARPS):
        per_thread = bm * bn * bk * (2 if glu else 1) / (32 * w)
        if 8 <= per_thread <= 128 and bk <= k_max and triton.cdiv(n, bn) >= MIN_PROGRAMS:
            out.append((bm, bn, bk, w, False))
    if m >= DOT_FROM_ROWS:
        for bn, bk, w in itertools.product(DOT_BLOCK_N, DOT_BLOCK_K, WARPS):
            if bk <= k_max and triton.cdiv(n, bn) >= MIN_PROGRAMS:
                out.append((max(16, bm), bn, bk, w, True))
    split = [tiles + (s,) for tiles in out for s in SPLIT_K
             if triton.cdiv(n, tiles[1]) < SPLIT_BELOW and triton.cdiv(k, tiles[2]) >= s]
    return out + split


def operands(m, n, k, norm=False, gate=False, glu=False, residual=False):
    g = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    args = dict(x=r(m, k), weight=r(n, k) * k ** -0.5)
    if norm:
        args["norm_eps"] = 1e-6
    if gate:
        args["gate"] = r(m, k)
    if glu:
        args["weight2"] = r(n, k) * k ** -0.5
    if residual:
        args["residual"] = r(m, n)
    return args


def weight_copies(ops, n_copies):
    """ops and n_copies - 1 more with their own copies of the weights (the activations shared: a decode step finds
    them in L2, written by the kernel before)."""
    extra = [{**ops, **{key: ops[key].clone() for key in ("weight", "weight2") if key in ops}}
             for _ in range(n_copies - 1)]
    return [ops] + extra


def cases(rows):
    for (name, n, k, kw), m in itertools.product(LAYERS, rows):
        for tiles in candidates(m, n, k, kw.get("glu", False)):
            yield name, m, n, k, kw, tiles


def runs(call, expected=None):
    """call() once; False where its kernel needs more shared memory or registers than the GPU has (Triton raises
    OutOfResources at the first launch): the tl.dot form stages its tiles through shared memory (Triton's software
    pipeline, 3 stages by default; compiled for sm_90, SGLU's pair takes 224 KiB at 16 x 1024 and 352 KiB at
    32 x 1024, against the 227 KiB a block may have), so the widest candidates do not run. With ``expected`` (the
    composition's output), raises where the output is further from it than bf16's rounding allows."""
    from triton.runtime.errors import OutOfResources
    try:
        y = call()
    except OutOfResources:
        return False
    if expected is not None:
        err = ((y.double() - expected.double()).norm() / expected.double().norm()).item()
        if not err <= 1e-2:
            raise AssertionError(f"output off the composition by {err:.2e} (relative)")
    return True


def compile_some(work):
    """A worker: run each variant once (compiles it into Triton's cache, shared with the parent)."""
    from tnllm_kernels.decode_linear.triton_gemv import decode_linear_triton
    for name, m, n, k, kw, tiles in work:
        runs(lambda: decode_linear_triton(**operands(m, n, k, **kw), tiles=tiles))
    torch.cuda.synchronize()
    return len(work)


HEADER = ["| layer | rows | composition (cuBLAS + kernels) us | kernel, today's tiles us | tiles today | "
          "best broadcast us | its tiles | best tl.dot us | its tiles | best GB/s |",
          "|---|---|---|---|---|---|---|---|---|---|"]


def summarize(layer, m, n, k, glu, composition_us, today_tiles, today_us, timed):
    """One layer at m rows: ``timed`` [(us, tiles)] of the candidates -> the fastest overall and of each form (None
    where a form had no candidates), as the table and the JSON report them."""
    def best_of(dot):
        return min((t for t in timed if t[1][4] == dot), default=(None, None))
    (best_us, best), (bc_us, bc), (dot_us, dot) = min(timed), best_of(False), best_of(True)
    return dict(layer=layer, rows=m, n=n, k=k, weight_bytes=n * k * 2 * (2 if glu else 1),
                composition_us=composition_us, today_tiles=today_tiles, today_us=today_us, best_tiles=best,
                best_us=best_us, best_broadcast_tiles=bc, best_broadcast_us=bc_us, best_dot_tiles=dot,
                best_dot_us=dot_us, all=[(t, us) for us, t in sorted(timed)])


def table_line(r):
    def cell(us, tiles):
        return "- | -" if tiles is None else f"{us:.2f} | {tiles}"
    return (f"| {r['layer']} | {r['rows']} | {r['composition_us']:.2f} | {r['today_us']:.2f} | {r['today_tiles']} | "
            f"{cell(r['best_broadcast_us'], r['best_broadcast_tiles'])} | "
            f"{cell(r['best_dot_us'], r['best_dot_tiles'])} | {r['weight_bytes'] / r['best_us'] / 1e3:.0f} |")


def block_line(results, rows):
    """One block's four layers summed per row count, "-" for a form that some layer had no candidates of."""
    def block_us(m, key):
        times = [r[key] for r in results if r["rows"] == m]
        return "-" if None in times else f"{sum(times):.1f}"
    return "per block of the 385M model (four layers, us), rows " + ", ".join(
        f"{m}: composition {block_us(m, 'composition_us')}, today {block_us(m, 'today_us')}, "
        f"best {block_us(m, 'best_us')} (broadcast {block_us(m, 'best_broadcast_us')}, "
        f"tl.dot {block_us(m, 'best_dot_us')})" for m in rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4,8,16", help="comma-separated row counts (batch sizes)")
    ap.add_argument("--jobs", type=int, default=12, help="processes compiling the variants before timing")
    ap.add_argument("--rep-ms", type=int, default=10, help="do_bench_cudagraph's rep per variant")
    ap.add_argument("--weights-in-l2", action="store_true",
                    help="time each variant on one copy of the weights (they stay in L2) instead of cycling copies")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_linear_tiles: needs a CUDA GPU")
    import triton
    from tnllm_kernels.decode_linear.triton_gemv import _tiles, decode_linear_triton
    rows = [int(r) for r in args.rows.split(",")]
    todo = list(cases(rows))
    t0 = time.time()
    if args.jobs > 1:
        chunks = [todo[i::args.jobs] for i in range(args.jobs)]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            pool.map(compile_some, chunks)
    print(f"{len(todo)} variants compiled in {time.time() - t0:.0f} s", flush=True)

    results, too_big, wrong = [], [], []
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, bf16, "
             "times in a CUDA graph (median, per call); GB/s counts the weights once; "
             "tiles (BLOCK_M, N, K, warps, dot[, split_k]); weights "
             + ("repeated (in L2)" if args.weights_in_l2 else "cycled through copies past L2 (from HBM)"), ""]
    lines += HEADER
    for (name, n, k, kw), m in itertools.product(LAYERS, rows):
        glu = kw.get("glu", False)
        ops = operands(m, n, k, **kw)
        copies = weight_copies(ops, 1 if args.weights_in_l2 else copies_past_l2(n * k * 2 * (2 if glu else 1)))

        def us(fn):     # per call of fn, each call on the next copy of the weights
            return cycled_us(fn, copies, args.rep_ms)

        ref_us = us(lambda c: decode_linear_reference(**c))
        now = _tiles(m, n, k, glu)
        now_us = us(lambda c: decode_linear_triton(**c, tiles=now))
        expected = decode_linear_reference(**ops)
        timed = []
        for tiles in candidates(m, n, k, glu):
            try:
                fits = runs(lambda: decode_linear_triton(**ops, tiles=tiles), expected)
            except AssertionError as e:
                wrong.append(f"{name} {m} rows {tiles}: {e}")
                continue
            if fits:
                timed.append((us(lambda c: decode_linear_triton(**c, tiles=tiles)), tiles))
            else:
                too_big.append(f"{name} {m} rows {tiles}")
        results.append(summarize(name, m, n, k, glu, ref_us, now, now_us, timed))
        lines.append(table_line(results[-1]))
        print(lines[-1], flush=True)
    lines.append("\n" + block_line(results, rows))
    lines.append(f"\n{len(too_big)} candidates did not fit the GPU (OutOfResources), not timed: " + "; ".join(too_big))
    lines.append(f"\n{len(wrong)} candidates gave wrong outputs, not timed" + (": " + "; ".join(wrong) if wrong else ""))
    report_sweep("decode_linear_tiles", lines, results)


if __name__ == "__main__":
    main()
