"""A prototype of the lightning-attention walks in Gluon (Triton's lower-level language), measured against the
Triton kernel (benchmarks/RESULTS.md, issue 14, seventeenth session). Not a kernel of the package.

Why: Triton 3.6's pipeliner issues a walk's copies of the next chunk after the current chunk's last matrix-unit
product, so every chunk begins by waiting for memory (Nsight Compute, sixteenth session). Gluon places them by hand:
here the next chunk's TMA copies go out at the start of the current chunk, into the other of two buffers, and the
chunk's products run asynchronously (wgmma with explicit waits), at 236 registers and 112 KB of shared memory: two
programs an SM, as the Triton walks.

Measured (one H200, Triton 3.6; `benchmarks/logs/gluon_forward_walk_h200_s17.log`): the forward walk (o) in 136-144
us of GPU time against the Triton walk's 182-195 (N = 1024 and 4096, 32768 tokens), o's error against float64 2.46e-3
(Triton's 2.44e-3). That run's kernel lacked the barrier after the output store's wait (below), a race it did not
show. The three backward walks (REVERSE, and the forward form on dO, v, k) compile for sm_90a (236 registers, no
spill; `python benchmarks/gluon_walk_prototype.py --registers`, no GPU needed) but have not run on a GPU yet:
`python3 benchmarks/gluon_walk_prototype.py` times all four against the Triton kernel.

Limits of the prototype: bf16, contiguous [B, N, H, 128] with N a multiple of 64, one segment (no starting or final
state), and the dv walk scales dO as the dk walk does (the Triton kernel scales q there, for dv's error). The Gluon
API changes between Triton versions (3.9 renamed the TMA copies): this file is written for Triton 3.6, the GPU
machine's. Ways found for the package's version, checked only by compiling:
- any N and batch: 3-D descriptors over [B, N, H*D] with [1, 64, W] boxes, reshaped to [64, W] in shared memory. TMA
  reads rows past a batch's N as zeros and does not write them. 234 / 236 registers, no spill, the same 112 KB. The
  last chunk's key decays then use its own length, as the Triton walk's do.
- the dv walk's rounding of q: the decayed q needs a [64, 128] buffer (16 KB) where zd_s and o_s (8 KB each) are now.
  So that walk would store its output from registers rather than through o_s, to stay at two programs an SM
  (2 x 113 KB of the SM's 228)."""
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

C, DK, BZ = 64, 128, 64


@gluon.jit
def _walk(x_desc, y_desc, z_desc, o_desc, SLOPE, N, H, REVERSE: gl.constexpr, num_warps: gl.constexpr):
    """One walk of triton_chunk._walk_kernel's four, one segment a program (no starting or final state): the program
    owns (batch*head, Z tile of 64 features) and walks all N // C chunks. Per chunk: the next chunk's three TMA
    copies are issued first (into the other buffer), then X Y^T, X T and the state's update run on the matrix unit
    together, and the masked (X Y^T) Z after the first of them."""
    C: gl.constexpr = x_desc.block_type.shape[0]
    BX: gl.constexpr = x_desc.block_type.shape[1]
    BZ: gl.constexpr = z_desc.block_type.shape[1]
    NZ: gl.constexpr = BX // BZ
    pid = gl.program_id(0)
    pid_bh = pid // NZ
    pid_z = pid % NZ
    b = pid_bh // H
    h = pid_bh % H
    row0 = b * N
    col_x = h * BX
    col_z = h * BX + pid_z * BZ

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)
    t_smem_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BX, BZ], gl.bfloat16)
    z_smem_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BZ], gl.bfloat16)

    x_s = gl.allocate_shared_memory(gl.bfloat16, [2, C, BX], x_desc.layout)
    y_s = gl.allocate_shared_memory(gl.bfloat16, [2, C, BX], y_desc.layout)
    z_s = gl.allocate_shared_memory(gl.bfloat16, [2, C, BZ], z_desc.layout)
    t_s = gl.allocate_shared_memory(gl.bfloat16, [BX, BZ], t_smem_l)       # the state, rounded, for X T
    zd_s = gl.allocate_shared_memory(gl.bfloat16, [C, BZ], z_smem_l)       # Z scaled by the key decays
    o_s = gl.allocate_shared_memory(gl.bfloat16, [C, BZ], o_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bars.index(0), count=1)
    mbarrier.init(bars.index(1), count=1)

    sl2 = gl.load(SLOPE + h).to(gl.float32) * 1.4426950408889634
    offs_i = gl.arange(0, C, layout=rows_l)
    offs_j = gl.arange(0, C, layout=cols_l)
    zl: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    offs_zr = gl.arange(0, C, layout=gl.SliceLayout(1, zl))
    if REVERSE:
        # out = ((X Y^T) * M^T) Z + lambda^(C-1-i) X T,   T <- lambda^C T + Y^T (lambda^(j+1) Z)
        gap = (offs_j[None, :] - offs_i[:, None]).to(gl.float32)
        row_dec = gl.exp2(-sl2 * (C - 1 - offs_i).to(gl.float32))
        z_dec = gl.exp2(-sl2 * (offs_zr + 1).to(gl.float32))
    else:
        # out = ((X Y^T) * M) Z + lambda^(i+1) X T,   T <- lambda^C T + Y^T (lambda^(C-1-j) Z)
        gap = (offs_i[:, None] - offs_j[None, :]).to(gl.float32)
        row_dec = gl.exp2(-sl2 * (offs_i + 1).to(gl.float32))
        z_dec = gl.exp2(-sl2 * (C - 1 - offs_zr).to(gl.float32))
    mask = gl.where(gap >= 0, gl.exp2(-sl2 * gl.maximum(gap, 0.0)), 0.0)
    chunk_decay = gl.exp2(-sl2 * C)

    T = gl.zeros([BX, BZ], gl.float32, layout=mma)
    t_s.store(T.to(gl.bfloat16))
    fence_async_shared()

    nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + z_desc.block_type.nbytes
    NC = N // C
    if REVERSE:
        first = NC - 1
    else:
        first = 0
    mbarrier.expect(bars.index(0), nbytes)
    tma.async_copy_global_to_shared(x_desc, [row0 + first * C, col_x], bars.index(0), x_s.index(0))
    tma.async_copy_global_to_shared(y_desc, [row0 + first * C, col_x], bars.index(0), y_s.index(0))
    tma.async_copy_global_to_shared(z_desc, [row0 + first * C, col_z], bars.index(0), z_s.index(0))
    for i in range(0, NC):
        if REVERSE:
            c = NC - 1 - i
            c_next = c - 1
        else:
            c = i
            c_next = c + 1
        s = i % 2
        mbarrier.wait(bars.index(s), phase=(i // 2) % 2)
        # every warp is past the chunk before (which read buffer 1 - s) before that buffer is refilled
        gl.thread_barrier()
        fence_async_shared()
        nxt = i + 1 < NC
        bar = bars.index(1 - s)
        mbarrier.expect(bar, nbytes, pred=nxt)
        tma.async_copy_global_to_shared(x_desc, [row0 + c_next * C, col_x], bar, x_s.index(1 - s), pred=nxt)
        tma.async_copy_global_to_shared(y_desc, [row0 + c_next * C, col_x], bar, y_s.index(1 - s), pred=nxt)
        tma.async_copy_global_to_shared(z_desc, [row0 + c_next * C, col_z], bar, z_s.index(1 - s), pred=nxt)

        x = x_s.index(s)
        y = y_s.index(s)
        z = z_s.index(s)
        # X Y^T and X T (T as it left the chunk before), both in flight
        sc = warpgroup_mma(x, y.permute((1, 0)), gl.zeros([C, C], gl.float32, layout=mma), use_acc=False,
                           is_async=True)
        xt = warpgroup_mma(x, t_s, gl.zeros([C, BZ], gl.float32, layout=mma), use_acc=False, is_async=True)
        # Z scaled by the key decays, then the state's update in flight too
        zv = z.load(zl)
        zd_s.store((zv.to(gl.float32) * z_dec[:, None]).to(gl.bfloat16))
        fence_async_shared()
        T = warpgroup_mma(y.permute((1, 0)), zd_s, T * chunk_decay, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=2, deps=(sc, ))
        p = gl.convert_layout((sc * mask).to(gl.bfloat16), a_reg)
        o = warpgroup_mma(p, z, gl.zeros([C, BZ], gl.float32, layout=mma), use_acc=False, is_async=True)
        xt, T, o = warpgroup_mma_wait(num_outstanding=0, deps=(xt, T, o))
        out = o + xt * row_dec[:, None]
        tma.store_wait(pendings=0)         # the one thread that issued the last chunk's store waits for it,
        gl.thread_barrier()                # and the others for that thread, before o_s is written again
        o_s.store(out.to(gl.bfloat16))
        t_s.store(T.to(gl.bfloat16))       # X T of this chunk has read t_s (waited above)
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [row0 + c * C, col_z], o_s)
    tma.store_wait(pendings=0)
    mbarrier.invalidate(bars.index(0))
    mbarrier.invalidate(bars.index(1))


def descriptors(x, y, z, out):
    """TMA descriptors over [B*N, H*D] views: one head's chunk is a [64, 128] box of x or y, [64, 64] of z or out."""
    B, N, H, D = x.shape
    wide = gl.NVMMASharedLayout.get_default_for([C, D], gl.bfloat16)
    tile = gl.NVMMASharedLayout.get_default_for([C, BZ], gl.bfloat16)
    return tuple(TensorDescriptor(t.view(B * N, H * D), [B * N, H * D], [H * D, 1], box, layout)
                 for t, box, layout in ((x, [C, D], wide), (y, [C, D], wide), (z, [C, BZ], tile), (out, [C, BZ], tile)))


def walk(x, y, z, slope, reverse, num_warps=4):
    """One walk: out = masked (x y^T) z plus x times the carried state (see _walk)."""
    B, N, H, D = x.shape
    assert D == DK and N % C == 0 and x.dtype == torch.bfloat16 and all(t.is_contiguous() for t in (x, y, z))
    out = torch.empty_like(z)
    _walk[(B * H * (D // BZ),)](*descriptors(x, y, z, out), slope, N, H, reverse, num_warps=num_warps)
    return out


def forward_backward(q, k, v, do, slope):
    """o, dq, dk, dv: the four walks as triton_chunk's _fwd and _bwd run them at one segment."""
    return [walk(q, k, v, slope, False), walk(do, v, k, slope, False), walk(v, do, q, slope, True),
            walk(k, q, do, slope, True)]


def main():
    """Errors against float64 and GPU time per forward+backward (profiler, and replayed from a CUDA graph), the
    Triton kernel beside the prototype, at N = 1024 and 4096 (32768 tokens)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from triton.testing import do_bench_cudagraph
    from compare_lightning_kernels import H, current, inputs, kernel_times
    from tnllm_kernels.lightning_attention.chunk import lightning_attention_chunk
    from tnllm_plugin.model import alibi_slopes
    slopes = torch.tensor(alibi_slopes(H), device="cuda")

    def triton_fb(q, k, v, do):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = current.lightning_attention_triton(*leaves, slopes, output_final_state=False)[0]
        return [o, *torch.autograd.grad(o, leaves, do)]

    def gluon_fb(q, k, v, do):
        return forward_backward(q, k, v, do, slopes)

    q, k, v, do = inputs(2, 4096, 7)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    o, _ = lightning_attention_chunk(*leaves, slopes.double())
    ref = [o.detach(), *torch.autograd.grad(o, leaves, do.double())]
    for name, fn in (("triton", triton_fb), ("gluon", gluon_fb)):
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(fn(q, k, v, do), ref)]
        print(f"N=4096 B=2 {name}: rel. error o / dq / dk / dv " + " / ".join(f"{e:.3e}" for e in errs), flush=True)
    for N, B in ((1024, 32), (4096, 8)):
        q, k, v, do = inputs(B, N, 3)
        for name, fn in (("triton", triton_fb), ("gluon", gluon_fb)) * 2:
            run = lambda: fn(q, k, v, do)       # noqa: E731
            per = kernel_times(run)
            graph_ms = do_bench_cudagraph(run, rep=100, return_mode="median")
            print(f"N={N} B={B} {name}: kernels {sum(per.values()):.1f} us, graph {graph_ms * 1000:.1f} us", flush=True)


def registers():
    """Registers, spilled bytes and shared memory of the forward and reverse walks compiled for sm_90a, without a
    GPU (lightning_registers.py's report, which does the same for the Triton walks)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from triton.experimental.gluon._runtime import GluonASTSource
    from lightning_registers import compiled_report
    wide = repr(gl.NVMMASharedLayout.get_default_for([C, DK], gl.bfloat16))
    tile = repr(gl.NVMMASharedLayout.get_default_for([C, BZ], gl.bfloat16))
    signature = {"x_desc": f"tensordesc<bf16[{C}, {DK}],{wide}>", "y_desc": f"tensordesc<bf16[{C}, {DK}],{wide}>",
                 "z_desc": f"tensordesc<bf16[{C}, {BZ}],{tile}>", "o_desc": f"tensordesc<bf16[{C}, {BZ}],{tile}>",
                 "SLOPE": "*fp32", "N": "i32", "H": "i32", "REVERSE": "constexpr", "num_warps": "constexpr"}
    for reverse in (False, True):
        source = GluonASTSource(_walk, signature, {"REVERSE": reverse, "num_warps": 4}, {})
        regs, spilled, _, shared = compiled_report(source, num_warps=4, num_stages=3)
        print(f"{'reverse' if reverse else 'forward'} walk: {regs} registers, {spilled} bytes spilled, "
              f"{shared / 1024:.1f} KB shared memory")


if __name__ == "__main__":
    if sys.argv[1:] == ["--registers"]:
        registers()
    else:
        main()
