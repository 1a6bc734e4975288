"""The four walks of triton_chunk.py written in Gluon (Triton's lower-level language) for Hopper (sm_90), where
they take the place of ``_walk_kernel`` for 16-bit inputs with 128-wide X and Y (see ``applies``).

Why a second version of one kernel: Triton 3.6's pipeliner issues a walk's copies of the next chunk only after the
current chunk's last matrix-unit product, so every chunk began by waiting for memory (Nsight Compute, sixteenth
session of benchmarks/RESULTS.md). Here the next chunk's TMA copies go out at the start of the current chunk, into
the other of two shared-memory buffers, and the chunk's products run asynchronously (wgmma with explicit waits).
At 4 warps, 232 to 255 registers (the o walk spills 8 bytes, outside the loop) and 112 KB of shared memory, it keeps
two programs an SM, as the Triton walk. Measured on one H200 (benchmarks/RESULTS.md, eighteenth session): the four
walks of forward+backward in 591-606 us of GPU time against the Triton walks' 770-789, with the same errors.

The math, the grid (batch*head x Z tile, segment) and the starting states are those of ``_walk_kernel``:

    forward walk:  out = ((X Y^T) * M) Z + lambda^(i+1) X T,        T <- lambda^m T + Y^T (lambda^(m-1-j) Z)
    reverse walk:  out = ((X Y^T) * M^T) Z + lambda^(m-1-i) X T,    T <- lambda^m T + (lambda^(j+1) Y)^T Z

with the dv walk (reverse, carrying dS) rounding the decayed Y as the Triton walk does, and the others the decayed
Z. Tensors are read through 3-D TMA descriptors over [B, N, H * width] views, so any batch, any N (the copies read
rows past N as zeros and do not write them) and the strides of views such as the model's QKVU split work.
"""
import functools
import os

import torch
import triton

# Gluon's API changes from one Triton release to the next (3.9 renamed shared_memory_descriptor._reinterpret to
# reinterpret, and the TMA copy to async_load, keeping the old name as an alias); these walks are written for, and
# tested with, 3.6: with another release triton_chunk.py, which catches this ImportError, runs its Triton walks.
if not triton.__version__.startswith("3.6."):
    raise ImportError(f"gluon_walk.py is written for Triton 3.6's Gluon API; this is Triton {triton.__version__}")
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)

_TMA_LOAD, _TMA_STORE = tma.async_copy_global_to_shared, tma.async_copy_shared_to_global

C = 64          # tokens a chunk
WX = 128        # features of X and Y, all held by a program
BZ = 64         # features of Z and the output a program owns
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _state_offsets(pid_z, BX: gl.constexpr, BZ: gl.constexpr, DV: gl.constexpr, STATE_T: gl.constexpr,
                   layout: gl.constexpr):
    """Offsets of this program's state tile [BX, BZ] in an fp32 [Dk, Dv] state (rows DV wide), transposed when
    STATE_T. Computed where used: held across the walk they would take 64 registers."""
    offs_x = gl.arange(0, BX, layout=gl.SliceLayout(1, layout))
    offs_z = pid_z * BZ + gl.arange(0, BZ, layout=gl.SliceLayout(0, layout))
    if STATE_T:
        return offs_x[:, None] + offs_z[None, :] * DV
    else:
        return offs_x[:, None] * DV + offs_z[None, :]


# Nothing but the descriptors is specialized (no integer's value or alignment, no pointer's alignment), so the
# kernel compiled for one walk's constexprs runs every later launch with them (see walk).
_SCALARS = ["SLOPE", "T0", "TOUT", "t0_bh", "t0_s", "N", "H", "NC", "CPS", "NSEG"]


@gluon.jit(do_not_specialize=_SCALARS, do_not_specialize_on_alignment=_SCALARS)
def _walk_kernel(x_desc, y_desc, z_desc, o_desc, SLOPE, T0, TOUT, t0_bh, t0_s, N, H, NC, CPS, NSEG,
                 WZ: gl.constexpr, DV: gl.constexpr, REVERSE: gl.constexpr, STATE_T: gl.constexpr,
                 HAS_T0: gl.constexpr, STORE_T: gl.constexpr, num_warps: gl.constexpr):
    """One program: (batch*head, Z tile) x segment, walking the segment's chunks (backwards when REVERSE) from its
    starting state (T0, strides t0_bh and t0_s; zero without HAS_T0), the state it ends with into TOUT when the
    walk ends there (STORE_T). STATE_T: the state is stored transposed ([Dv, Dk] in a [Dk, Dv] buffer of row
    width DV). Per chunk: the next chunk's three copies are issued first, then X Y^T, X T and the state's update
    run on the matrix unit together, and the masked (X Y^T) Z once X Y^T is done."""
    dt: gl.constexpr = x_desc.dtype
    C: gl.constexpr = x_desc.block_type.shape[1]
    BX: gl.constexpr = x_desc.block_type.shape[2]
    BZ: gl.constexpr = z_desc.block_type.shape[2]
    NZ: gl.constexpr = WZ // BZ
    ROUND_Y: gl.constexpr = REVERSE and not STATE_T     # the dv walk (see the module's docstring)
    pid_bh = gl.program_id(0) // NZ
    pid_z = gl.program_id(0) % NZ
    pid_s = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    col_x = h * BX
    col_z = h * WZ + pid_z * BZ
    c_lo = pid_s * CPS
    c_hi = gl.minimum(c_lo + CPS, NC)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BZ, 16])
    a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    blk_rows: gl.constexpr = gl.SliceLayout(1, blk)
    wide_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BX], dt)
    tile_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BZ], dt)
    t_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BX, BZ], dt)

    x_s = gl.allocate_shared_memory(dt, [2, 1, C, BX], x_desc.layout)
    y_s = gl.allocate_shared_memory(dt, [2, 1, C, BX], y_desc.layout)
    z_s = gl.allocate_shared_memory(dt, [2, 1, C, BZ], z_desc.layout)
    t_s = gl.allocate_shared_memory(dt, [BX, BZ], t_l)          # the state, rounded, for X T
    # 16 KB of scratch: the decayed Z tile and the output tile, or (dv walk) the decayed Y, whose first half the
    # output tile then shares (its store is waited for before the next chunk writes there)
    scratch = gl.allocate_shared_memory(dt, [C, BX], wide_l)
    if ROUND_Y:
        yd_s = scratch
        o_s = scratch._reinterpret(dt, [1, C, BZ], o_desc.layout)
    else:
        pair = scratch._reinterpret(dt, [2, C, BZ], tile_l)
        zd_s = pair.index(0)
        o_s = pair.index(1)._reinterpret(dt, [1, C, BZ], o_desc.layout)
    o_2d = o_s.reshape([C, BZ])
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bars.index(0), count=1)
    mbarrier.init(bars.index(1), count=1)

    sl2 = gl.load(SLOPE + h).to(gl.float32) * 1.4426950408889634
    offs_i = gl.arange(0, C, layout=rows_l)
    offs_j = gl.arange(0, C, layout=cols_l)
    offs_r = gl.arange(0, C, layout=blk_rows)
    if REVERSE:
        gap = (offs_j[None, :] - offs_i[:, None]).to(gl.float32)
    else:
        gap = (offs_i[:, None] - offs_j[None, :]).to(gl.float32)
    mask = gl.where(gap >= 0, gl.exp2(-sl2 * gl.maximum(gap, 0.0)), 0.0)

    if HAS_T0:
        T = gl.load(T0 + pid_bh.to(gl.int64) * t0_bh + pid_s.to(gl.int64) * t0_s
                    + _state_offsets(pid_z, BX, BZ, DV, STATE_T, mma))
    else:
        T = gl.zeros([BX, BZ], gl.float32, layout=mma)
    t_s.store(T.to(dt))
    fence_async_shared()

    nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + z_desc.block_type.nbytes
    n = c_hi - c_lo
    if REVERSE:
        first = c_hi - 1
    else:
        first = c_lo
    mbarrier.expect(bars.index(0), nbytes)
    _TMA_LOAD(x_desc, [b, first * C, col_x], bars.index(0), x_s.index(0))
    _TMA_LOAD(y_desc, [b, first * C, col_x], bars.index(0), y_s.index(0))
    _TMA_LOAD(z_desc, [b, first * C, col_z], bars.index(0), z_s.index(0))
    for i in range(0, n):
        if REVERSE:
            c = c_hi - 1 - i
            c_next = c - 1
        else:
            c = c_lo + i
            c_next = c + 1
        m = gl.minimum(N - c * C, C)            # the chunk's tokens (the last chunk may be partial)
        s = i % 2
        mbarrier.wait(bars.index(s), phase=(i // 2) % 2)
        if ROUND_Y:                             # o_s lies in yd_s: the last chunk's output store must be done
            tma.store_wait(pendings=0)
        # every warp is past the chunk before (which read buffer 1 - s, and o_s) before they are written again
        gl.thread_barrier()
        fence_async_shared()
        nxt = i + 1 < n
        bar = bars.index(1 - s)
        mbarrier.expect(bar, nbytes, pred=nxt)
        _TMA_LOAD(x_desc, [b, c_next * C, col_x], bar, x_s.index(1 - s), pred=nxt)
        _TMA_LOAD(y_desc, [b, c_next * C, col_x], bar, y_s.index(1 - s), pred=nxt)
        _TMA_LOAD(z_desc, [b, c_next * C, col_z], bar, z_s.index(1 - s), pred=nxt)

        x = x_s.index(s).reshape([C, BX])
        y = y_s.index(s).reshape([C, BX])
        z = z_s.index(s).reshape([C, BZ])
        # X Y^T and X T (T as it left the chunk before), both in flight
        sc = warpgroup_mma(x, y.permute((1, 0)), gl.zeros([C, C], gl.float32, layout=mma), use_acc=False,
                           is_async=True)
        xt = warpgroup_mma(x, t_s, gl.zeros([C, BZ], gl.float32, layout=mma), use_acc=False, is_async=True)
        # the decayed operand of the state's update, then the update in flight too
        if REVERSE:
            dec_r = gl.exp2(-sl2 * (offs_r + 1).to(gl.float32))                   # lambda^(j+1)
        else:
            dec_r = gl.where(offs_r < m, gl.exp2(-sl2 * (m - 1 - offs_r).to(gl.float32)), 0.0)
        if ROUND_Y:
            for half in gl.static_range(BX // BZ):
                yh = y.slice(half * BZ, BZ, dim=1).load(blk)
                yd_s.slice(half * BZ, BZ, dim=1).store((yh.to(gl.float32) * dec_r[:, None]).to(dt))
            fence_async_shared()
            T = warpgroup_mma(yd_s.permute((1, 0)), z, T * gl.exp2(-sl2 * m.to(gl.float32)), is_async=True)
        else:
            zv = z.load(blk)
            zd_s.store((zv.to(gl.float32) * dec_r[:, None]).to(dt))
            fence_async_shared()
            T = warpgroup_mma(y.permute((1, 0)), zd_s, T * gl.exp2(-sl2 * m.to(gl.float32)), is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=2, deps=(sc, ))
        p = gl.convert_layout((sc * mask).to(dt), a_reg)
        o = warpgroup_mma(p, z, gl.zeros([C, BZ], gl.float32, layout=mma), use_acc=False, is_async=True)
        xt, T, o = warpgroup_mma_wait(num_outstanding=0, deps=(xt, T, o))
        if REVERSE:
            row_dec = gl.where(offs_i < m, gl.exp2(-sl2 * (m - 1 - offs_i).to(gl.float32)), 0.0)
        else:
            row_dec = gl.exp2(-sl2 * (offs_i + 1).to(gl.float32))
        out = o + xt * row_dec[:, None]
        if not ROUND_Y:                         # the one thread that issued the last chunk's store waits for it
            tma.store_wait(pendings=0)
        # and every warp for that thread and for the others' products (which read t_s, and yd_s where o_s lies)
        gl.thread_barrier()
        o_2d.store(out.to(dt))
        t_s.store(T.to(dt))                     # X T of this chunk has read t_s (waited above)
        fence_async_shared()
        _TMA_STORE(o_desc, [b, c * C, col_z], o_s)
    tma.store_wait(pendings=0)
    mbarrier.invalidate(bars.index(0))
    mbarrier.invalidate(bars.index(1))

    if STORE_T:
        if REVERSE:
            last = 0
        else:
            last = NSEG - 1
        if pid_s == last:                       # the segment where the whole walk ends
            gl.store(TOUT + pid_bh.to(gl.int64) * BX * WZ + _state_offsets(pid_z, BX, BZ, DV, STATE_T, mma), T)


@functools.lru_cache(maxsize=None)
def _smem_layout(dtype, block_width):
    return gl.NVMMASharedLayout.get_default_for([1, C, block_width], _GL_DTYPES[dtype])


def _descriptor(t, block_width):
    """A TMA descriptor over t [B, N, H, W] as [B, N, H * W], reading [1, C, block_width] boxes."""
    B, N, H, W = t.shape
    return TensorDescriptor(t, [B, N, H * W], [t.stride(0), t.stride(1), 1], [1, C, block_width],
                            _smem_layout(t.dtype, block_width))


def _tma_readable(t) -> bool:
    """Whether t [B, N, H, W] is a view TMA reads as [B, N, H * W]: heads and features packed, 16-byte aligned."""
    elem = t.element_size()
    return (t.stride(3) == 1 and (t.shape[2] == 1 or t.stride(2) == t.shape[3]) and t.data_ptr() % 16 == 0
            and all((s * elem) % 16 == 0 for s in t.stride()[:2]))


@functools.lru_cache(maxsize=None)
def _hopper(device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def runs_on(device: torch.device) -> bool:
    """Whether the Gluon walks run on this device: a Hopper GPU, not turned off by TNLLM_GLUON_WALKS=0 (which runs
    the Triton walks everywhere, e.g. to compare the two)."""
    return os.environ.get("TNLLM_GLUON_WALKS", "1") != "0" and device.type == "cuda" and _hopper(device)


def applies(x, y, z, out, C_tokens) -> bool:
    """Whether this walk can run here: ``runs_on`` x's device, bf16 or fp16, 64-token chunks, X and Y 128 features
    wide, Z a multiple of 64, every tensor a view TMA can read (see _tma_readable)."""
    return (runs_on(x.device) and C_tokens == C and x.dtype in _GL_DTYPES
            and x.shape[-1] == WX and y.shape[-1] == WX and z.shape[-1] % BZ == 0
            and all(_tma_readable(t) for t in (x, y, z, out)))


# (device, dtype, constexprs) -> the compiled kernel
_COMPILED = {}


def walk(x, y, z, out, slope, t0, tout, NC, CPS, NSEG, reverse, transposed_state):
    """Launch one walk (triton_chunk._walk's arguments; ``applies`` must hold). The first launch for given
    constexprs goes through the JIT; later ones straight to the kernel it compiled: through the JIT, forward+backward
    took 0.88 ms at N = 1024 against 0.68 ms this way (host-bound, on an H200; benchmarks/RESULTS.md)."""
    B, N, H, _ = x.shape
    WZ = z.shape[-1]
    t0_buf, t0_bh, t0_s = t0
    grid = (B * H * (WZ // BZ), NSEG, 1)
    args = dict(x_desc=_descriptor(x, WX), y_desc=_descriptor(y, WX), z_desc=_descriptor(z, BZ),
                o_desc=_descriptor(out, BZ), SLOPE=slope, T0=t0_buf if t0_buf is not None else slope,
                TOUT=tout if tout is not None else slope, t0_bh=t0_bh, t0_s=t0_s, N=N, H=H, NC=NC, CPS=CPS, NSEG=NSEG,
                WZ=WZ, DV=WX if transposed_state else WZ, REVERSE=reverse, STATE_T=transposed_state,
                HAS_T0=t0_buf is not None, STORE_T=tout is not None, num_warps=4)
    key = (x.device, x.dtype, args["WZ"], args["DV"], reverse, transposed_state, args["HAS_T0"], args["STORE_T"])
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = _walk_kernel[grid](**args)
    else:
        compiled[grid](*(args[name] for name in _walk_kernel.arg_names))
