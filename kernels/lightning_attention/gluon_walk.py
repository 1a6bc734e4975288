"""The four walks of triton_chunk.py written in Gluon (Triton's lower-level language) for Hopper (sm_90), where
they take the place of ``_walk_kernel`` for 16-bit inputs with 128-wide X and Y (see ``applies``).

Why a second version of one kernel: Triton 3.6's pipeliner issues a walk's copies of the next chunk only after the
current chunk's last matrix-unit product, so every chunk began by waiting for memory (Nsight Compute, sixteenth
session of benchmarks/RESULTS.md). Here the next chunk's TMA copies go out at the start of the current chunk, into
the other of two shared-memory buffers, and the chunk's products run asynchronously (wgmma with explicit waits).
At 4 warps, 232 to 255 registers (the o walk spills 8 bytes, outside the loop) and 112 KB of shared memory, it keeps
two programs an SM, as the Triton walk. Measured on one H200 (benchmarks/RESULTS.md, eighteenth session): the four
walks of forward+backward in 591-606 us of GPU time against the Triton walks' 770-789, with the same errors.

The backward's dk and dv walks (heads of 128) run as one launch, _walk_pair_kernel: each program is one of the two
walks' programs, and a (batch*head, segment)'s four programs are neighbours in the grid, so that the q and dO tiles
both walks read come from memory once. On one H200 that saved 10-15 us of the 290-310 the two take (nineteenth
session): the walks are not purely bound by memory, so reading a third less did not make them a third faster.

Where the grid would fill the GPU anyway, the o and dq walks (Z 128 wide) run as one program per (batch*head,
segment) holding both Z tiles instead of two programs of one tile each: _walk_both_tiles_kernel, two warpgroups
(warp-specialized), one an SM. Each chunk's X and Y are copied once and its score product X Y^T, which the two
programs each computed, is computed once and handed over in shared memory. On one H200, forward+backward 4-5% shorter
at N = 1024 to 4096 and 32768 (twenty-first session); at 16384, where the plan then takes four segments instead of
two, 1.6% (twenty-second). The pair keeps one tile a program: as two-tile programs it was slower from N = 4096 on.

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
WORKER_REGS = 240   # registers of the second warpgroup of _walk_both_tiles_kernel (the first takes 256)
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


@gluon.jit
def _batch_head(pid_bh, H, BX: gl.constexpr):
    """Batch and head of program row pid_bh, and the column where the head's X and Y features start."""
    b = pid_bh // H
    h = pid_bh % H
    return b, h, h * BX


@gluon.jit
def _log2_decay(SLOPE, h):
    """slope[h] * log2(e): lambda^n = exp2(-n * this)."""
    return gl.load(SLOPE + h).to(gl.float32) * 1.4426950408889634


@gluon.jit
def _segment_chunks(pid_s, CPS, NC):
    """Chunks [c_lo, c_hi) of segment pid_s."""
    c_lo = pid_s * CPS
    c_hi = gl.minimum(c_lo + CPS, NC)
    return c_lo, c_hi


@gluon.jit
def _walked_chunk(i, c_lo, c_hi, REVERSE: gl.constexpr):
    """The i-th chunk walked (backwards from c_hi - 1 when REVERSE) and the one after it in walk order."""
    if REVERSE:
        c = c_hi - 1 - i
        c_next = c - 1
    else:
        c = c_lo + i
        c_next = c + 1
    return c, c_next


@gluon.jit
def _chunk_mask(sl2, offs_i, offs_j, REVERSE: gl.constexpr):
    """The masked decays inside a chunk: lambda^(i - j) where j <= i (reverse walks: lambda^(j - i) where j >= i),
    else 0; sl2 = log2(1 / lambda)."""
    if REVERSE:
        gap = (offs_j[None, :] - offs_i[:, None]).to(gl.float32)
    else:
        gap = (offs_i[:, None] - offs_j[None, :]).to(gl.float32)
    return gl.where(gap >= 0, gl.exp2(-sl2 * gl.maximum(gap, 0.0)), 0.0)


@gluon.jit
def _update_decay(sl2, offs_r, m, REVERSE: gl.constexpr):
    """Row j's decay in the state's update of a chunk of m tokens: lambda^(j+1) (reverse), else lambda^(m-1-j) and
    0 past the chunk's tokens."""
    if REVERSE:
        dec = gl.exp2(-sl2 * (offs_r + 1).to(gl.float32))
    else:
        dec = gl.where(offs_r < m, gl.exp2(-sl2 * (m - 1 - offs_r).to(gl.float32)), 0.0)
    return dec


@gluon.jit
def _output_decay(sl2, offs_i, m, REVERSE: gl.constexpr):
    """Row i's decay of X T, the carried state's part of the output: lambda^(m-1-i) and 0 past the chunk's m tokens
    (reverse), else lambda^(i+1)."""
    if REVERSE:
        dec = gl.where(offs_i < m, gl.exp2(-sl2 * (m - 1 - offs_i).to(gl.float32)), 0.0)
    else:
        dec = gl.exp2(-sl2 * (offs_i + 1).to(gl.float32))
    return dec


@gluon.jit
def _start_state(T0, t0_bh, t0_s, pid_bh, pid_s, pid_z, BX: gl.constexpr, BZ: gl.constexpr, DV: gl.constexpr,
                 STATE_T: gl.constexpr, HAS_T0: gl.constexpr, layout: gl.constexpr):
    """The program's state tile at its segment's start: from T0 (strides t0_bh, t0_s), or zero without HAS_T0."""
    if HAS_T0:
        T = gl.load(T0 + pid_bh.to(gl.int64) * t0_bh + pid_s.to(gl.int64) * t0_s
                    + _state_offsets(pid_z, BX, BZ, DV, STATE_T, layout))
    else:
        T = gl.zeros([BX, BZ], gl.float32, layout=layout)
    return T


@gluon.jit
def _store_final_state(TOUT, T, pid_bh, pid_s, pid_z, NSEG, WZ: gl.constexpr, DV: gl.constexpr,
                       REVERSE: gl.constexpr, STATE_T: gl.constexpr, layout: gl.constexpr):
    """The state tile into TOUT where the whole walk ends: the last segment, or the first for a reverse walk."""
    BX: gl.constexpr = T.shape[0]
    BZ: gl.constexpr = T.shape[1]
    if REVERSE:
        last = 0
    else:
        last = NSEG - 1
    if pid_s == last:
        gl.store(TOUT + pid_bh.to(gl.int64) * BX * WZ + _state_offsets(pid_z, BX, BZ, DV, STATE_T, layout), T)


# Nothing but the descriptors is specialized (no integer's value or alignment, no pointer's alignment), so the
# kernel compiled for one walk's constexprs runs every later launch with them (see walk).
_SCALARS = ["SLOPE", "T0", "TOUT", "t0_bh", "t0_s", "N", "H", "NC", "CPS", "NSEG"]


@gluon.jit
def _walk_program(x_desc, y_desc, z_desc, o_desc, x_s, y_s, z_s, t_s, scratch, bars, SLOPE, T0, TOUT, t0_bh, t0_s,
                  N, H, NC, CPS, NSEG, pid_bh, pid_z, pid_s, WZ: gl.constexpr, DV: gl.constexpr,
                  REVERSE: gl.constexpr, STATE_T: gl.constexpr, HAS_T0: gl.constexpr, STORE_T: gl.constexpr,
                  NUM_WARPS: gl.constexpr):
    """One program of a walk: (batch*head, Z tile) x segment, walking the segment's chunks (backwards when REVERSE)
    from its starting state (T0, strides t0_bh and t0_s; zero without HAS_T0), the state it ends with into TOUT when
    the walk ends there (STORE_T). STATE_T: the state is stored transposed ([Dv, Dk] in a [Dk, Dv] buffer of row
    width DV). Per chunk: the next chunk's three copies are issued first, then X Y^T, X T and the state's update
    run on the matrix unit together, and the masked (X Y^T) Z once X Y^T is done. Shared memory (see _buffers) is
    the caller's, so that one kernel can hold two walks (_walk_pair_kernel) in one allocation."""
    dt: gl.constexpr = x_desc.dtype
    C: gl.constexpr = x_desc.block_type.shape[1]
    BX: gl.constexpr = x_desc.block_type.shape[2]
    BZ: gl.constexpr = z_desc.block_type.shape[2]
    ROUND_Y: gl.constexpr = REVERSE and not STATE_T     # the dv walk (see the module's docstring)
    b, h, col_x = _batch_head(pid_bh, H, BX)
    col_z = h * WZ + pid_z * BZ
    c_lo, c_hi = _segment_chunks(pid_s, CPS, NC)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BZ, 16])
    a_reg: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
    blk_rows: gl.constexpr = gl.SliceLayout(1, blk)
    tile_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BZ], dt)
    # the scratch: the decayed Z tile and the output tile, or (dv walk) the decayed Y, whose first half the output
    # tile then shares (its store is waited for before the next chunk writes there)
    if ROUND_Y:
        yd_s = scratch
        o_s = scratch._reinterpret(dt, [1, C, BZ], o_desc.layout)
    else:
        pair = scratch._reinterpret(dt, [2, C, BZ], tile_l)
        zd_s = pair.index(0)
        o_s = pair.index(1)._reinterpret(dt, [1, C, BZ], o_desc.layout)
    o_2d = o_s.reshape([C, BZ])
    mbarrier.init(bars.index(0), count=1)
    mbarrier.init(bars.index(1), count=1)

    sl2 = _log2_decay(SLOPE, h)
    offs_i = gl.arange(0, C, layout=rows_l)
    offs_j = gl.arange(0, C, layout=cols_l)
    offs_r = gl.arange(0, C, layout=blk_rows)
    mask = _chunk_mask(sl2, offs_i, offs_j, REVERSE)

    T = _start_state(T0, t0_bh, t0_s, pid_bh, pid_s, pid_z, BX, BZ, DV, STATE_T, HAS_T0, mma)
    t_s.store(T.to(dt))
    fence_async_shared()

    nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + z_desc.block_type.nbytes
    n = c_hi - c_lo
    first, _ = _walked_chunk(0, c_lo, c_hi, REVERSE)
    mbarrier.expect(bars.index(0), nbytes)
    _TMA_LOAD(x_desc, [b, first * C, col_x], bars.index(0), x_s.index(0))
    _TMA_LOAD(y_desc, [b, first * C, col_x], bars.index(0), y_s.index(0))
    _TMA_LOAD(z_desc, [b, first * C, col_z], bars.index(0), z_s.index(0))
    for i in range(0, n):
        c, c_next = _walked_chunk(i, c_lo, c_hi, REVERSE)
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
        dec_r = _update_decay(sl2, offs_r, m, REVERSE)
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
        out = o + xt * _output_decay(sl2, offs_i, m, REVERSE)[:, None]
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
        _store_final_state(TOUT, T, pid_bh, pid_s, pid_z, NSEG, WZ, DV, REVERSE, STATE_T, mma)


@gluon.jit
def _buffers(x_desc, z_desc):
    """A walk program's shared memory (112 KB at bf16): X, Y and Z tiles in two stages (X and Y are read in the
    same boxes, hence one layout), the state rounded for X T, 16 KB of scratch and the two stages' barriers."""
    dt: gl.constexpr = x_desc.dtype
    C: gl.constexpr = x_desc.block_type.shape[1]
    BX: gl.constexpr = x_desc.block_type.shape[2]
    BZ: gl.constexpr = z_desc.block_type.shape[2]
    x_s = gl.allocate_shared_memory(dt, [2, 1, C, BX], x_desc.layout)
    y_s = gl.allocate_shared_memory(dt, [2, 1, C, BX], x_desc.layout)
    z_s = gl.allocate_shared_memory(dt, [2, 1, C, BZ], z_desc.layout)
    t_s = gl.allocate_shared_memory(dt, [BX, BZ], gl.NVMMASharedLayout.get_default_for([BX, BZ], dt))
    scratch = gl.allocate_shared_memory(dt, [C, BX], gl.NVMMASharedLayout.get_default_for([C, BX], dt))
    bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    return x_s, y_s, z_s, t_s, scratch, bars


@gluon.jit(do_not_specialize=_SCALARS, do_not_specialize_on_alignment=_SCALARS)
def _walk_kernel(x_desc, y_desc, z_desc, o_desc, SLOPE, T0, TOUT, t0_bh, t0_s, N, H, NC, CPS, NSEG,
                 WZ: gl.constexpr, DV: gl.constexpr, REVERSE: gl.constexpr, STATE_T: gl.constexpr,
                 HAS_T0: gl.constexpr, STORE_T: gl.constexpr, num_warps: gl.constexpr):
    """One walk: a _walk_program per (batch*head, Z tile) x segment."""
    NZ: gl.constexpr = WZ // z_desc.block_type.shape[2]
    x_s, y_s, z_s, t_s, scratch, bars = _buffers(x_desc, z_desc)
    _walk_program(x_desc, y_desc, z_desc, o_desc, x_s, y_s, z_s, t_s, scratch, bars, SLOPE, T0, TOUT, t0_bh, t0_s,
                  N, H, NC, CPS, NSEG, gl.program_id(0) // NZ, gl.program_id(0) % NZ, gl.program_id(1),
                  WZ, DV, REVERSE, STATE_T, HAS_T0, STORE_T, num_warps)


@gluon.jit(do_not_specialize=_SCALARS, do_not_specialize_on_alignment=_SCALARS)
def _walk_pair_kernel(v_desc, do_desc, qz_desc, dk_desc, k_desc, q_desc, doz_desc, dv_desc, SLOPE, T0, TOUT, t0_bh,
                      t0_s, N, H, NC, CPS, NSEG, HAS_T0: gl.constexpr, STORE_T: gl.constexpr,
                      num_warps: gl.constexpr):
    """The dk and dv walks (128-wide heads) in one launch, each program one of the two walks' programs: for each
    (batch*head, segment) the two walks' four programs are neighbours in the grid, so they run at the same time and
    the q and dO tiles one of them reads from memory the others can find in L2 (apart, the two walks read six
    tiles a chunk from memory; together, at best four; the single walks' two Z tiles already share X and Y so).
    dk walk: X = v, Y = dO, Z = q, state dS^T; dv walk: X = k, Y = q, Z = dO, state dS (its dS_0 into TOUT)."""
    W: gl.constexpr = 128                       # every width: Z's (WZ) and the state's rows (DV)
    NZ: gl.constexpr = 2
    pid_bh = gl.program_id(0) // (2 * NZ)
    pid_z = gl.program_id(0) % NZ
    x_s, y_s, z_s, t_s, scratch, bars = _buffers(v_desc, qz_desc)
    if (gl.program_id(0) // NZ) % 2 == 0:
        _walk_program(v_desc, do_desc, qz_desc, dk_desc, x_s, y_s, z_s, t_s, scratch, bars, SLOPE, T0, TOUT, t0_bh,
                      t0_s, N, H, NC, CPS, NSEG, pid_bh, pid_z, gl.program_id(1), W, W, True, True, HAS_T0,
                      False, num_warps)
    else:
        _walk_program(k_desc, q_desc, doz_desc, dv_desc, x_s, y_s, z_s, t_s, scratch, bars, SLOPE, T0, TOUT, t0_bh,
                      t0_s, N, H, NC, CPS, NSEG, pid_bh, pid_z, gl.program_id(1), W, W, True, False, HAS_T0,
                      STORE_T, num_warps)


@gluon.jit
def _tile_partition(x_desc, y_desc, z_desc, o_desc, x_s, y_s, z_s, t_s, zd_s, o_s, p_s, load_bars, free_bars, p_bar,
                    SLOPE, T0, TOUT, t0_bh, t0_s, N, H, NC, CPS, NSEG, TILE: gl.constexpr, REVERSE: gl.constexpr,
                    STATE_T: gl.constexpr, HAS_T0: gl.constexpr, STORE_T: gl.constexpr):
    """One warpgroup of _walk_both_tiles_kernel: Z tile TILE of program (batch*head, segment), the walk of
    _walk_program over buffers the two partitions share. Tile 0 (the default partition) issues the next chunk's
    copies (once its stage is free of the worker's reads of the chunk before) and computes the masked scores X Y^T
    into p_s, then arrives on p_bar; tile 1 waits there and arrives on the stage's free barrier when done with the
    chunk. Both then take (masked scores) Z_tile from p_s. The mask is computed in the loop (held, it would take 32
    of tile 0's registers)."""
    dt: gl.constexpr = x_desc.dtype
    C: gl.constexpr = x_desc.block_type.shape[1]
    BX: gl.constexpr = x_desc.block_type.shape[2]
    BZ: gl.constexpr = z_desc.block_type.shape[2]
    W: gl.constexpr = 2 * BZ
    pid_bh = gl.program_id(0)
    pid_s = gl.program_id(1)
    b, h, col_x = _batch_head(pid_bh, H, BX)
    col_z = h * W + TILE * BZ
    c_lo, c_hi = _segment_chunks(pid_s, CPS, NC)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BZ, 16])
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    cols_l: gl.constexpr = gl.SliceLayout(0, mma)
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    blk_rows: gl.constexpr = gl.SliceLayout(1, blk)
    t_my = t_s.index(TILE)
    zd_my = zd_s.index(TILE)
    o_my = o_s.index(TILE)
    o_2d = o_my.reshape([C, BZ])

    sl2 = _log2_decay(SLOPE, h)
    offs_i = gl.arange(0, C, layout=rows_l)
    offs_j = gl.arange(0, C, layout=cols_l)
    offs_r = gl.arange(0, C, layout=blk_rows)

    T = _start_state(T0, t0_bh, t0_s, pid_bh, pid_s, TILE, BX, BZ, W, STATE_T, HAS_T0, mma)
    t_my.store(T.to(dt))
    fence_async_shared()

    nbytes: gl.constexpr = 2 * x_desc.block_type.nbytes + 2 * z_desc.block_type.nbytes
    n = c_hi - c_lo
    first, _ = _walked_chunk(0, c_lo, c_hi, REVERSE)
    if TILE == 0:
        mbarrier.expect(load_bars.index(0), nbytes)
        _TMA_LOAD(x_desc, [b, first * C, col_x], load_bars.index(0), x_s.index(0))
        _TMA_LOAD(y_desc, [b, first * C, col_x], load_bars.index(0), y_s.index(0))
        _TMA_LOAD(z_desc, [b, first * C, h * W], load_bars.index(0), z_s.index(0))
        _TMA_LOAD(z_desc, [b, first * C, h * W + BZ], load_bars.index(0), z_s.index(1))
    for i in range(0, n):
        c, c_next = _walked_chunk(i, c_lo, c_hi, REVERSE)
        m = gl.minimum(N - c * C, C)
        s = i % 2
        mbarrier.wait(load_bars.index(s), phase=(i // 2) % 2)
        gl.thread_barrier()
        if TILE == 0:
            # the other stage held chunk i-1, which the worker must be done with before it is written again: that
            # barrier's ((i - 1) // 2)-th completion, its parity written so that i = 0 divides no negative number
            mbarrier.wait(free_bars.index(1 - s), phase=((i + 1) // 2 + 1) % 2, pred=i >= 1)
            fence_async_shared()
            nxt = i + 1 < n
            bar = load_bars.index(1 - s)
            mbarrier.expect(bar, nbytes, pred=nxt)
            _TMA_LOAD(x_desc, [b, c_next * C, col_x], bar, x_s.index(1 - s), pred=nxt)
            _TMA_LOAD(y_desc, [b, c_next * C, col_x], bar, y_s.index(1 - s), pred=nxt)
            _TMA_LOAD(z_desc, [b, c_next * C, h * W], bar, z_s.index(2 * (1 - s)), pred=nxt)
            _TMA_LOAD(z_desc, [b, c_next * C, h * W + BZ], bar, z_s.index(2 * (1 - s) + 1), pred=nxt)

        x = x_s.index(s).reshape([C, BX])
        y = y_s.index(s).reshape([C, BX])
        z = z_s.index(2 * s + TILE).reshape([C, BZ])
        dec_r = _update_decay(sl2, offs_r, m, REVERSE)
        zv = z.load(blk)
        zd_my.store((zv.to(gl.float32) * dec_r[:, None]).to(dt))
        fence_async_shared()
        # Tile 0 waits for the scores alone before it issues X T and the state's update: with all three products in
        # flight, registers ran out around its 64 x 64 fp32 scores (ptxas spilled 96 / 84 bytes in the o / dq walk,
        # against 32 / 0 this way) and the program ran 3-10% longer (twenty-third session, benchmarks/RESULTS.md).
        if TILE == 0:
            sc = warpgroup_mma(x, y.permute((1, 0)), gl.zeros([C, C], gl.float32, layout=mma), use_acc=False,
                               is_async=True)
            sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc, ))
            p_s.store((sc * _chunk_mask(sl2, offs_i, offs_j, REVERSE)).to(dt))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(p_bar, count=1)
        xt = warpgroup_mma(x, t_my, gl.zeros([C, BZ], gl.float32, layout=mma), use_acc=False, is_async=True)
        T = warpgroup_mma(y.permute((1, 0)), zd_my, T * gl.exp2(-sl2 * m.to(gl.float32)), is_async=True)
        if TILE == 1:       # tile 0's scores for this chunk (it writes the next only after this tile frees the stage)
            mbarrier.wait(p_bar, phase=i % 2)
        o = warpgroup_mma(p_s, z, gl.zeros([C, BZ], gl.float32, layout=mma), use_acc=False, is_async=True)
        xt, T, o = warpgroup_mma_wait(num_outstanding=0, deps=(xt, T, o))
        out = o + xt * _output_decay(sl2, offs_i, m, REVERSE)[:, None]
        tma.store_wait(pendings=0)
        gl.thread_barrier()
        o_2d.store(out.to(dt))
        t_my.store(T.to(dt))
        fence_async_shared()
        _TMA_STORE(o_desc, [b, c * C, col_z], o_my)
        if TILE == 1:       # done with the stage's X, Y and Z and with p_s (their reads are fenced above)
            gl.thread_barrier()
            mbarrier.arrive(free_bars.index(s), count=1)
    tma.store_wait(pendings=0)

    if STORE_T:
        _store_final_state(TOUT, T, pid_bh, pid_s, TILE, NSEG, W, W, REVERSE, STATE_T, mma)


@gluon.jit(do_not_specialize=_SCALARS, do_not_specialize_on_alignment=_SCALARS)
def _walk_both_tiles_kernel(x_desc, y_desc, z_desc, o_desc, SLOPE, T0, TOUT, t0_bh, t0_s, N, H, NC, CPS, NSEG,
                            REVERSE: gl.constexpr, STATE_T: gl.constexpr, HAS_T0: gl.constexpr,
                            STORE_T: gl.constexpr, WORKER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """A walk with 128-wide Z (not the dv walk) as one program per (batch*head, segment) holding both 64-wide Z
    tiles, one warpgroup each (warp-specialized, _tile_partition): each chunk's X and Y are copied once and its
    score product X Y^T computed once, where two programs (_walk_kernel) each do both. 8 warps, 168 KB of shared
    memory: one program an SM."""
    dt: gl.constexpr = x_desc.dtype
    C: gl.constexpr = x_desc.block_type.shape[1]
    BX: gl.constexpr = x_desc.block_type.shape[2]
    BZ: gl.constexpr = z_desc.block_type.shape[2]
    tile_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([C, BZ], dt)
    x_s = gl.allocate_shared_memory(dt, [2, 1, C, BX], x_desc.layout)
    y_s = gl.allocate_shared_memory(dt, [2, 1, C, BX], x_desc.layout)
    z_s = gl.allocate_shared_memory(dt, [4, 1, C, BZ], z_desc.layout)
    t_s = gl.allocate_shared_memory(dt, [2, BX, BZ], gl.NVMMASharedLayout.get_default_for([BX, BZ], dt))
    zd_s = gl.allocate_shared_memory(dt, [2, C, BZ], tile_l)
    o_s = gl.allocate_shared_memory(dt, [2, 1, C, BZ], o_desc.layout)
    p_s = gl.allocate_shared_memory(dt, [C, C], gl.NVMMASharedLayout.get_default_for([C, C], dt))
    load_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    free_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(load_bars.index(i), count=1)
        mbarrier.init(free_bars.index(i), count=1)
    mbarrier.init(p_bar.index(0), count=1)
    pb = p_bar.index(0)
    # tile 0 in the kernel's 4 warps (the default partition), tile 1 in 4 more with WORKER_REGS registers
    gl.warp_specialize([
        (_tile_partition, (x_desc, y_desc, z_desc, o_desc, x_s, y_s, z_s, t_s, zd_s, o_s, p_s, load_bars,
                           free_bars, pb, SLOPE, T0, TOUT, t0_bh, t0_s, N, H, NC, CPS, NSEG,
                           0, REVERSE, STATE_T, HAS_T0, STORE_T)),
        (_tile_partition, (x_desc, y_desc, z_desc, o_desc, x_s, y_s, z_s, t_s, zd_s, o_s, p_s, load_bars,
                           free_bars, pb, SLOPE, T0, TOUT, t0_bh, t0_s, N, H, NC, CPS, NSEG,
                           1, REVERSE, STATE_T, HAS_T0, STORE_T)),
    ], [4], [WORKER_REGS])


@functools.lru_cache(maxsize=None)
def _smem_layout(dtype, block_width):
    return gl.NVMMASharedLayout.get_default_for([1, C, block_width], _GL_DTYPES[dtype])


def _descriptor(t, block_width):
    """A TMA descriptor over t [B, N, H, W] as [B, N, H * W], reading [1, C, block_width] boxes."""
    B, N, H, W = t.shape
    return TensorDescriptor(t, [B, N, H * W], [t.stride(0), t.stride(1), 1], [1, C, block_width],
                            _smem_layout(t.dtype, block_width))


class _Box:
    """What the compiled kernel's launcher reads of a TensorDescriptor (Triton 3.6: base, shape, strides, padding),
    for the launches after the first: TensorDescriptor's own checks (half of a walk's host time) repeat those of
    _tma_readable, which every launch has passed."""
    __slots__ = ("base", "shape", "strides", "padding")

    def __init__(self, t):
        B, N, H, W = t.shape
        stride = t.stride()
        self.base, self.shape, self.strides, self.padding = t, [B, N, H * W], [stride[0], stride[1], 1], "zero"


def _tma_readable(t) -> bool:
    """Whether t [B, N, H, W] is a view TMA reads as [B, N, H * W]: heads and features packed, 16-byte aligned."""
    stride = t.stride()
    elem = t.element_size()
    return (stride[3] == 1 and (t.shape[2] == 1 or stride[2] == t.shape[3]) and (stride[0] * elem) % 16 == 0
            and (stride[1] * elem) % 16 == 0 and t.data_ptr() % 16 == 0)


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


def takes_heads(device, dtype, dk, dv) -> bool:
    """Whether the Gluon walks take all four walks of heads this wide in this dtype on this device (a view TMA
    cannot read aside, which falls back to the Triton walk): heads of 128, 16-bit. From these alone, so that the
    forward and the backward pass get one answer."""
    return runs_on(device) and dtype in _GL_DTYPES and dk == WX and dv == WX


def pair_applies(q, k, v, do, C_tokens) -> bool:
    """Whether the dk and dv walks can run as one launch here (walk_pair): as ``applies`` needs, with q, k, v and
    dO all 128 wide (``applies`` checks v, dO and q; k is the one tensor left to check)."""
    return (q.shape[-1] == WX and v.shape[-1] == WX and applies(v, do, q, q, C_tokens) and _tma_readable(k))


# (kernel, device, dtype, constexprs) -> the kernel compiled for them
_COMPILED = {}


def _launch(kernel, grid, boxes, scalars, constexprs, device, dtype):
    """kernel[grid] over the TMA boxes ((tensor, box width) each), then the scalars and the constexprs, in the
    kernel's parameters' order. The first launch for given constexprs goes through the JIT; later ones straight to
    the kernel it compiled, with _Box for the descriptors: through the JIT, forward+backward took 0.88 ms at N = 1024
    against 0.68 ms this way (host-bound, on an H200; benchmarks/RESULTS.md)."""
    key = (kernel, device, dtype, *constexprs)
    compiled = _COMPILED.get(key)
    if compiled is not None:
        compiled[grid](*(_Box(t) for t, _ in boxes), *scalars, *constexprs)
        return
    values = [*(_descriptor(t, width) for t, width in boxes), *scalars, *constexprs]
    _COMPILED[key] = kernel[grid](**dict(zip(kernel.arg_names, values)))


def _state_args(slope, t0, tout):
    """The walks' state scalars: SLOPE, T0, TOUT, t0_bh, t0_s (a pointer never read stands in for an absent one)."""
    t0_buf, t0_bh, t0_s = t0
    return (slope, t0_buf if t0_buf is not None else slope, tout if tout is not None else slope, t0_bh, t0_s)


def walk(x, y, z, out, slope, t0, tout, NC, CPS, NSEG, reverse, transposed_state, both_tiles=False):
    """Launch one walk (triton_chunk._walk's arguments; ``applies`` must hold). With ``both_tiles``, a walk whose Z
    is 128 wide, but the dv walk, runs as one program holding both Z tiles (_walk_both_tiles_kernel): the caller
    asks for it where those programs, one an SM, fill the GPU."""
    B, N, H, _ = x.shape
    WZ = z.shape[-1]
    if both_tiles and WZ == 2 * BZ and not (reverse and not transposed_state):
        # REVERSE, STATE_T, HAS_T0, STORE_T, WORKER_REGS, num_warps
        constexprs = (reverse, transposed_state, t0[0] is not None, tout is not None, WORKER_REGS, 4)
        _launch(_walk_both_tiles_kernel, (B * H, NSEG, 1), [(x, WX), (y, WX), (z, BZ), (out, BZ)],
                (*_state_args(slope, t0, tout), N, H, NC, CPS, NSEG), constexprs, x.device, x.dtype)
        return
    # WZ, DV, REVERSE, STATE_T, HAS_T0, STORE_T, num_warps
    constexprs = (WZ, WX if transposed_state else WZ, reverse, transposed_state, t0[0] is not None, tout is not None, 4)
    _launch(_walk_kernel, (B * H * (WZ // BZ), NSEG, 1), [(x, WX), (y, WX), (z, BZ), (out, BZ)],
            (*_state_args(slope, t0, tout), N, H, NC, CPS, NSEG), constexprs, x.device, x.dtype)


def walk_pair(q, k, v, do, dk, dv, slope, t0, tout, NC, CPS, NSEG):
    """Launch the dk and dv walks together (_walk_pair_kernel): both reverse from dS at each segment's end (t0, as
    triton_chunk._walk's), dS_0 into tout (or None). ``pair_applies`` must hold, and dk, dv be TMA-writable."""
    B, N, H, _ = q.shape
    _launch(_walk_pair_kernel, (B * H * 2 * (WX // BZ), NSEG, 1),
            [(v, WX), (do, WX), (q, BZ), (dk, BZ), (k, WX), (q, WX), (do, BZ), (dv, BZ)],
            (*_state_args(slope, t0, tout), N, H, NC, CPS, NSEG), (t0[0] is not None, tout is not None, 4),
            q.device, q.dtype)
