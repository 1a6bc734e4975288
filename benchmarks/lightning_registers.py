"""Registers, spills and shared memory of the lightning-attention kernels compiled for sm_90a, without a GPU:
Triton compiles each kernel to PTX here and its bundled ptxas reports (-v). The four walks and the pre-pass at the
benchmark's tiles (bf16, 16 heads of 128, chunk 64, several segments), each autotune config; with Triton 3.6 also
the Gluon walks (gluon_walk.py) that replace the Triton walks on Hopper. A register count at
255 with bytes spilled is what made several variants slow on the H200 (benchmarks/RESULTS.md, issue 14), so a
variant can be screened here before it costs GPU time. The counts are those of the installed Triton: use the GPU
machine's version (3.6) for numbers that hold there.

    python benchmarks/lightning_registers.py [OTHER_triton_chunk.py ...]
    python benchmarks/lightning_registers.py --configs 4x2 --ptx-dir /tmp/before   # then again after a refactor:
    diff -r /tmp/before /tmp/after       # each kernel's PTX without debug lines and labels: the same code or not
"""
import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from compare_lightning_kernels import current, load     # its way to load another version

H, N, D, C = 16, 4096, 128, 64
STRIDES = dict(b=N * H * D, n=H * D, h=D, d=1)      # a contiguous [B, N, H, D] tensor


def ptxas_report(jit_fn, args, num_warps, num_stages, ptx_path=None):
    """(registers, spill stores, spill loads, shared bytes) of jit_fn compiled for sm_90a. ``args``: name -> a
    pointer type string ("*bf16"), an int, or a constexpr value; ints are specialised as the launcher does (1 as a
    constant, multiples of 16 marked divisible by 16), parameters not given take their defaults."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(jit_fn.arg_names):
        param = jit_fn.params[i]
        value = args[name] if name in args else param.default
        if value is inspect.Parameter.empty:
            raise ValueError(f"{jit_fn.__name__}: no value given for its parameter {name}")
        if param.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, str):
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return compiled_report(ASTSource(jit_fn, signature, constexprs, attrs), num_warps, num_stages, ptx_path)


def compiled_report(source, num_warps, num_stages, ptx_path=None):
    """(registers, spill stores, spill loads, shared bytes) of a Triton or Gluon source compiled for sm_90a, from
    its bundled ptxas's -v report; with ``ptx_path``, its PTX there without debug lines and labels (which move
    when code is split into functions that compile to the same instructions)."""
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    if ptx_path is not None:
        ptx = compiled.asm["ptx"].split(".section\t.debug")[0]
        with open(ptx_path, "w") as f:
            f.writelines(line + "\n" for line in ptx.splitlines()
                         if not re.match(r"\s*(\.loc|\.file|//)|\$L__tmp", line))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    out = subprocess.run([get_ptxas(90).path, "--gpu-name", "sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                         text=True)
    os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"ptxas gave no register report:\n{text}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), compiled.metadata.shared


def kernels_to_compile(mod):
    """(label, jit function, arguments) for the four walks and the backward pre-pass, as _bwd and _fwd launch them."""
    tensors = {}
    for p in "xyzo":
        tensors.update({f"s{p}b": STRIDES["b"], f"s{p}n": STRIDES["n"], f"s{p}h": STRIDES["h"]})
        if p != "o":
            tensors[f"s{p}d"] = STRIDES["d"]
    walks = (("o (forward)", False, False), ("dq", False, True), ("dk", True, True), ("dv", True, False))
    for label, reverse, transposed in walks:
        args = dict(X="*bf16", Y="*bf16", Z="*bf16", OUT="*bf16", SLOPE="*fp32", T0="*fp32", TOUT="*fp32", **tensors,
                    t0_bh=4 * D * D, t0_s=D * D, N=N, H=H, NC=N // C, CPS=N // C // 4, NSEG=4, WX=D, WZ=D, DV=D,
                    BX=D, BZ=64, C=C, REVERSE=reverse, STATE_T=transposed, HAS_T0=True, STORE_T=False,
                    DOT_PREC="tf32")
        if "PREFETCH" in mod._walk_kernel.fn.arg_names and hasattr(mod, "_walk_prefetches"):
            args["PREFETCH"] = mod._walk_prefetches(reverse, transposed)
        yield f"walk {label}", mod._walk_kernel.fn, args
    args = dict(A="*bf16", Bm="*bf16", SLOPE="*fp32", SUB="*fp32", sab=STRIDES["b"], san=STRIDES["n"], sah=D, sad=1,
                sbb=STRIDES["b"], sbn=STRIDES["n"], sbh=D, sbd=1, N=N, H=H, NC=N // C, CPS=N // C // 4, NSEG=4,
                SPLITS=2, CPSS=N // C // 8, DK=D, DV=D, BK=D, BV=D, C=C, REVERSE=True, DOT_PREC="tf32")
    if "PREFETCH" in mod._seg_local_kernel.fn.arg_names and hasattr(mod, "_prefetches"):
        args["PREFETCH"] = mod._prefetches()
    yield "pre-pass (backward)", mod._seg_local_kernel.fn, args


def gluon_walks_to_compile(gw):
    """(label, Gluon source) for the four walks of gluon_walk.py as _fwd and _bwd launch them at several segments
    (starting states; the o and dv walks also store the final state), and the dk and dv walks' paired launch: the
    walks that replace _walk_kernel's on Hopper with Triton 3.6."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    def desc(width):
        layout = repr(gl.NVMMASharedLayout.get_default_for([1, C, width], gl.bfloat16))
        return f"tensordesc<bf16[1, {C}, {width}],{layout}>"
    signature = dict(x_desc=desc(gw.WX), y_desc=desc(gw.WX), z_desc=desc(gw.BZ), o_desc=desc(gw.BZ))
    signature.update({name: "*fp32" if name in ("SLOPE", "T0", "TOUT") else "i32" for name in gw._SCALARS})
    walks = (("o (forward)", False, False, True), ("dq", False, True, False), ("dk", True, True, False),
             ("dv", True, False, True))
    for label, reverse, transposed, store in walks:
        constexprs = dict(WZ=D, DV=D, REVERSE=reverse, STATE_T=transposed, HAS_T0=True, STORE_T=store, num_warps=4)
        yield f"gluon walk {label}", GluonASTSource(gw._walk_kernel, {**signature, **{k: "constexpr" for k in
                                                                                     constexprs}}, constexprs, {})
    # the o and dq walks as one program holding both Z tiles (two warpgroups; the register count is the default
    # partition's, 256 at most, beside the worker's WORKER_REGS)
    for label, reverse, transposed, store in walks[:2]:
        constexprs = dict(REVERSE=reverse, STATE_T=transposed, HAS_T0=True, STORE_T=store,
                          WORKER_REGS=gw.WORKER_REGS, num_warps=4)
        yield f"gluon walk {label}, both tiles", GluonASTSource(
            gw._walk_both_tiles_kernel, {**signature, **{k: "constexpr" for k in constexprs}}, constexprs, {})
    # the dk and dv walks in one launch (_bwd's, for 128-wide heads): one program is either walk's, so it takes
    # the larger of their registers
    pair = {f"{name}_desc": desc(gw.WX if name in ("v", "do", "k", "q") else gw.BZ)
            for name in ("v", "do", "qz", "dk", "k", "q", "doz", "dv")}
    pair.update({name: sig for name, sig in signature.items() if not name.endswith("_desc")})
    constexprs = dict(HAS_T0=True, STORE_T=True, num_warps=4)
    yield "gluon dk+dv walks", GluonASTSource(gw._walk_pair_kernel, {**pair, **{k: "constexpr" for k in constexprs}},
                                              constexprs, {})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("others", nargs="*", help="other versions of triton_chunk.py")
    ap.add_argument("--ptx-dir", help="also write each kernel's PTX (without debug lines) into this folder")
    ap.add_argument("--configs", default=None, metavar="WxS[,WxS]",
                    help="warps x stages to compile (default: each version's autotune space)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("lightning_registers.py: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
    versions = {os.path.splitext(os.path.basename(p))[0]: load(p, i) for i, p in enumerate(args.others)}
    versions["current"] = current
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)

    def ptx_path(*names):
        return os.path.join(args.ptx_dir, re.sub(r"\W+", "_", "_".join(names)) + ".ptx") if args.ptx_dir else None
    print(f"Triton {triton.__version__}, sm_90a, bf16, H={H}, D={D}, chunk {C}")
    print("\n| version | kernel | warps x stages | registers | spilled bytes (stores / loads) | shared KB |")
    print("|---|---|---|---|---|---|")
    for name, mod in versions.items():
        configs = [(c.num_warps, c.num_stages) for c in mod._configs()] if args.configs is None else \
            [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
        for label, fn, kargs in kernels_to_compile(mod):
            for warps, stages in configs:
                regs, st, ld, smem = ptxas_report(fn, kargs, warps, stages, ptx_path(name, label, f"{warps}x{stages}"))
                print(f"| {name} | {label} | {warps} x {stages} | {regs} | {st} / {ld} | {smem / 1024:.1f} |",
                      flush=True)
        if getattr(mod, "_gluon_walk", None) is not None:          # Triton 3.6: the Hopper walks in Gluon too
            for label, source in gluon_walks_to_compile(mod._gluon_walk):
                regs, st, ld, smem = compiled_report(source, 4, 1, ptx_path(name, label))
                print(f"| {name} | {label} | 4 x - | {regs} | {st} / {ld} | {smem / 1024:.1f} |", flush=True)


if __name__ == "__main__":
    main()
