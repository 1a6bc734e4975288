"""Host time of the lightning-attention call on a GPU machine, and where it goes: the host cost of one launch of a
torch op, of a small Triton kernel with few and with ~30 arguments (through JITFunction and through the compiled
kernel's own launcher), of torch.autograd.grad through a trivial Function, then our forward+backward's host time per
call (calls queued behind a long GPU sleep, so that the GPU never makes the host wait) and a cProfile of 30 calls.

    python benchmarks/lightning_host_time.py        # on the GPU, after `source benchmarks/device_env.sh`
"""
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from compare_lightning_kernels import H, TOKENS, inputs  # noqa: E402  (the same benchmark shapes)
from tnllm_kernels.lightning_attention import triton_chunk as tc  # noqa: E402
from tnllm_plugin.model import alibi_slopes  # noqa: E402


@triton.jit
def few(X, n, B: tl.constexpr):
    o = tl.arange(0, B)
    tl.store(X + o, tl.load(X + o, mask=o < n, other=0.0) + 1.0, mask=o < n)


@triton.jit
def many(X, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20, a21, a22,
         a23, a24, a25, a26, a27, n, B: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr):
    o = tl.arange(0, B)
    tl.store(X + o, tl.load(X + o, mask=o < n, other=0.0) + 1.0, mask=o < n)


def host_us(fn, iters=200):
    """Host microseconds per call of fn, the GPU kept busy by a long sleep kernel queued first."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e9))
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return dt


class Trivial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def launch_costs():
    x = torch.zeros(1024, device="cuda")
    ints = list(range(1, 29))
    compiled_few = few[(1,)](x, 1000, B=1024)
    compiled_many = many[(1,)](x, *ints, 1000, B=1024, C0=1, C1=2, C2=3)
    print(f"torch x.add_(1): {host_us(lambda: x.add_(1)):.1f} us")
    print(f"torch.empty(1M): {host_us(lambda: torch.empty(1 << 20, device='cuda')):.1f} us")
    print(f"triton few args: {host_us(lambda: few[(1,)](x, 1000, B=1024)):.1f} us")
    print(f"triton many args: {host_us(lambda: many[(1,)](x, *ints, 1000, B=1024, C0=1, C1=2, C2=3)):.1f} us")
    try:        # the compiled kernel's launcher takes every argument, constexprs included (Triton 3.6)
        run_few, run_many = compiled_few[(1, 1, 1)], compiled_many[(1, 1, 1)]
        print(f"compiled few args: {host_us(lambda: run_few(x, 1000, 1024)):.1f} us")
        print(f"compiled many args: {host_us(lambda: run_many(x, *ints, 1000, 1024, 1, 2, 3)):.1f} us")
    except Exception as e:          # the launcher's argument convention differs between versions
        print("compiled launch failed:", repr(e))
    leaf = torch.zeros(1024, device="cuda", requires_grad=True)
    gy = torch.ones(1024, device="cuda")
    grad_us = host_us(lambda: torch.autograd.grad(Trivial.apply(leaf), leaf, gy))
    print(f"autograd.grad through a trivial Function (2 torch ops): {grad_us:.1f} us")


def attention_host_time(ns=(1024, 32768)):
    slopes = torch.tensor(alibi_slopes(H), device="cuda")
    for N in ns:
        q, k, v, do = inputs(TOKENS // N, N, 0)
        leaves = [t.requires_grad_() for t in (q, k, v)]

        def fb():
            o, _ = tc.lightning_attention_triton(*leaves, slopes, output_final_state=False)
            torch.autograd.grad(o, leaves, do)

        def fwd():
            with torch.no_grad():
                tc.lightning_attention_triton(*leaves, slopes, output_final_state=False)

        print(f"N={N}: host per fwd+bwd {host_us(fb, 50):.0f} us, per fwd (no grad) {host_us(fwd, 50):.0f} us")
        torch.cuda._sleep(int(3e9))
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30):
            fb()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue()[:6000])


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("lightning_host_time.py measures a GPU machine's host: no CUDA device here")
    launch_costs()
    attention_host_time()
