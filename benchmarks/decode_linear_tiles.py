"""Sweep the decode GEMV kernel's tiles (tnllm_kernels.decode_linear) on the 385M model's four linear layers of a
block, in bf16, at 1, 8 and 16 rows, and print, per layer and row count, the fastest tiles, the tiles the kernel
chooses today (_tiles) and the composition the model runs without it (cuBLAS plus the norm/gate/product/add
kernels around it), each timed inside a CUDA graph (triton.testing.do_bench_cudagraph), as a decode step runs.

The sweep chose _tiles's table; run it again after a change to the kernel. Compiling ~400 variants takes a few
minutes in one process, so --jobs processes compile them first (into Triton's cache), then this one times them.

    source benchmarks/device_env.sh && python3 benchmarks/decode_linear_tiles.py [--jobs 12] [--rows 1,8,16]
writes $OUT/decode_linear_tiles.md (and .json) when OUT is set.
"""
import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tnllm_kernels.decode_linear import decode_linear_reference  # noqa: E402

# the 385M block: (layer, N, K, what the kernel folds in)
LAYERS = [("qkvu", 4096, 1024, dict(norm=True)), ("out_proj", 1024, 1024, dict(norm=True, gate=True, residual=True)),
          ("sglu_pair", 2816, 1024, dict(norm=True, glu=True)), ("l3", 1024, 2816, dict(residual=True))]
BLOCK_N = (2, 4, 8, 16, 32)
BLOCK_K = (128, 256, 512, 1024, 2048)
WARPS = (2, 4, 8)


def candidates(m, n, k, glu):
    """Tiles worth timing: the broadcast product [BLOCK_M, BLOCK_N, BLOCK_K] (two with GLU) at 8 to 128 fp32
    values a thread, BLOCK_K no wider than K's power of two, at least 32 programs."""
    import triton
    bm = max(1, triton.next_power_of_2(m))
    out = []
    for bn, bk, w in itertools.product(BLOCK_N, BLOCK_K, WARPS):
        per_thread = bm * bn * bk * (2 if glu else 1) / (32 * w)
        if 8 <= per_thread <= 128 and bk <= max(128, triton.next_power_of_2(k)) and triton.cdiv(n, bn) >= 32:
            out.append((bm, bn, bk, w))
    return out


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


def cases(rows):
    for (name, n, k, kw), m in itertools.product(LAYERS, rows):
        for tiles in candidates(m, n, k, kw.get("glu", False)):
            yield name, m, n, k, kw, tiles


def compile_some(work):
    """A worker: run each variant once (compiles it into Triton's cache, shared with the parent)."""
    from tnllm_kernels.decode_linear.triton_gemv import decode_linear_triton
    for name, m, n, k, kw, tiles in work:
        decode_linear_triton(**operands(m, n, k, **kw), tiles=tiles)
    torch.cuda.synchronize()
    return len(work)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,8,16", help="comma-separated row counts (batch sizes)")
    ap.add_argument("--jobs", type=int, default=12, help="processes compiling the variants before timing")
    ap.add_argument("--rep-ms", type=int, default=10, help="do_bench_cudagraph's rep per variant")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_linear_tiles: needs a CUDA GPU")
    import triton
    from triton.testing import do_bench_cudagraph
    from tnllm_kernels.decode_linear.triton_gemv import _tiles, decode_linear_triton
    rows = [int(r) for r in args.rows.split(",")]
    todo = list(cases(rows))
    t0 = time.time()
    if args.jobs > 1:
        chunks = [todo[i::args.jobs] for i in range(args.jobs)]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            pool.map(compile_some, chunks)
    print(f"{len(todo)} variants compiled in {time.time() - t0:.0f} s", flush=True)

    def time_us(fn):
        fn()
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median") * 1e3

    results = []
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}, bf16, "
             "times in a CUDA graph (median); GB/s counts the weights once", "",
             "| layer | rows | composition (cuBLAS + kernels) us | kernel, today's tiles us | tiles today | "
             "best us | best tiles (BLOCK_M, N, K, warps) | best GB/s |", "|---|---|---|---|---|---|---|---|"]
    for (name, n, k, kw), m in itertools.product(LAYERS, rows):
        ops = operands(m, n, k, **kw)
        wbytes = n * k * 2 * (2 if kw.get("glu") else 1)
        ref_us = time_us(lambda: decode_linear_reference(**ops))
        now = _tiles(m, n, k, kw.get("glu", False))
        now_us = time_us(lambda: decode_linear_triton(**ops, tiles=now))
        timed = []
        for tiles in candidates(m, n, k, kw.get("glu", False)):
            timed.append((time_us(lambda: decode_linear_triton(**ops, tiles=tiles)), tiles))
        best_us, best = min(timed)
        results.append(dict(layer=name, rows=m, n=n, k=k, composition_us=ref_us, today_tiles=now, today_us=now_us,
                            best_tiles=best, best_us=best_us, all=[(t, us) for us, t in sorted(timed)]))
        lines.append(f"| {name} | {m} | {ref_us:.2f} | {now_us:.2f} | {now} | {best_us:.2f} | {best} | "
                     f"{wbytes / best_us / 1e3:.0f} |")
        print(lines[-1], flush=True)

    def block_us(m, key):       # one block's four layers at m rows
        return sum(r[key] for r in results if r["rows"] == m)
    lines.append("\nper block of the 385M model (four layers), rows " + ", ".join(
        f"{m}: composition {block_us(m, 'composition_us'):.1f} us, today {block_us(m, 'today_us'):.1f} us, "
        f"best {block_us(m, 'best_us'):.1f} us" for m in rows))
    text = "\n".join(lines)
    print("\n" + text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "decode_linear_tiles.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out, "decode_linear_tiles.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
