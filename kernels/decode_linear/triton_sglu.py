"""A decoding block's channel mixer in one Triton kernel: the norm, SGLU's pair and product, W_3 and the residual add.

Why: in the 385M model's CUDA-graph decode step at batch 16, W_3 took a kernel of its own after the pair's (6.1 us of
32.7 a layer on an H200), and the step timed without that kernel was 125 us a token faster (twelfth session,
benchmarks/RESULTS.md): at this size a kernel boundary costs more than W_3's 5.8 MB of weights take to read. Two
GEMV kernels (triton_gemv.py) become one:

* phase 1, one program per BLOCK_F columns of the FFN width: the pair's sums over the normalised rows (the GEMV's
  K loop, triton_gemv._row_sums), the product rounded as the composition rounds it, then this program's share of
  W_3: product [rows, BLOCK_F] times W_3's BLOCK_F columns, a partial output [rows, d_model] in fp32, stored to a
  workspace, one slot per program;
* a barrier over the whole grid: each program counts itself in, the last one opens it (a generation number);
* phase 2, every program sums the partials of a few output columns in program order (the same sums whichever
  program arrived last), rounds, adds the residual, stores.

A grid-wide barrier needs every program resident at once: at most one per SM is asked for (the grid is at most the
SM count; decode_sglu_applies refuses wider layers, which keep the two GEMV kernels). Under programmatic dependent
launch every program has passed the wait for the kernel before it, and let the next one launch, before the barrier,
so no later kernel's waiting programs can stand between this kernel's programs and the SMs.

tl.dot on tensor cores (rows padded to 16; fp32 tensors and the interpreter as fp32 products, as in the GEMV), for
the GEMV's tl.dot range of rows (triton_gemv.DOT_FROM_ROWS to MAX_ROWS); fewer rows keep the two GEMV kernels. The
CPU interpreter runs programs one after the other, where a barrier cannot open: there the two phases are two
launches.
"""
import functools

import torch
import triton
import triton.language as tl

from .._interpreter import interpreting
from ..gla_decode.triton_step import _pdl_handoff, _round, pdl_launch
from .triton_gemv import _product, _row_sums, _weight_tiles


@triton.jit
def _grid_barrier(BAR, programs):
    """Every program of the grid waits here until all have arrived. BAR [2] int32: the count of programs arrived
    and the generation; the last to arrive resets the count and moves the generation on, the others spin until it
    moves. Each program reads the generation before it counts itself, so it cannot miss the move. Works for any grid
    size, launch after launch, without a reset in between."""
    tl.debug_barrier()      # every thread's workspace stores issued before the program counts itself
    generation = tl.atomic_add(BAR + 1, 0, sem="acquire", scope="gpu")
    arrived = tl.atomic_add(BAR, 1, sem="acq_rel", scope="gpu")
    if arrived == programs - 1:
        tl.atomic_xchg(BAR, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(BAR + 1, 1, sem="release", scope="gpu")
    else:
        while tl.atomic_add(BAR + 1, 0, sem="acquire", scope="gpu") == generation:
            pass
    tl.debug_barrier()


@triton.jit
def _sglu_kernel(X, W1, W2, W3, Y, WS, BAR, M, D, F, stride_x, stride_w1, stride_w2, stride_w3, stride_y, eps,
                 RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, PARTS: tl.constexpr, F32_DOT: tl.constexpr,
                 PHASE: tl.constexpr, PDL: tl.constexpr):
    """X [M, D] (the block's hidden rows, also the residual), W1 and W2 [F, D], W3 [D, F] -> Y [M, D]. WS: fp32
    [programs, BLOCK_M, D]. PHASE 0: both phases with the grid barrier between (GPU); 1 or 2: that phase alone (the
    interpreter, two launches)."""
    DT = Y.dtype.element_ty
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    if PHASE != 2:
        cols = pid * BLOCK_F + tl.arange(0, BLOCK_F)        # this program's columns of the FFN width
        cm = cols < F
        ks = tl.arange(0, BLOCK_K)
        w1_cols = W1 + cols.to(tl.int64)[:, None] * stride_w1
        w2_cols = W2 + cols.to(tl.int64)[:, None] * stride_w2
        w1_first, w2_first = _weight_tiles(w1_cols, w2_cols, cm, 0, ks, D, True)     # before the wait, as the GEMV
        _pdl_handoff(PDL)
        acc1, acc2 = _row_sums(X, X, w1_cols, w2_cols, w1_first, w2_first, rows, rm, cm, ks, 0, D, D, stride_x, 0,
                               eps, DT, True, False, True, RNE, BLOCK_M, BLOCK_F, BLOCK_K, True, F32_DOT)
        # SGLU's product as the composition rounds it; the columns past F are 0 (their weights loaded as 0)
        product = _round(_round(acc1, DT, RNE) * _round(acc2, DT, RNE), DT, RNE)
        # this program's part of W_3: product [BLOCK_M, BLOCK_F] times W3[:, cols], BLOCK_D outputs at a time
        ds = tl.arange(0, BLOCK_D)
        w3_cols = W3 + cols[None, :]
        part = WS + pid.to(tl.int64) * BLOCK_M * D + rows[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            dm = d0 + ds < D
            w3 = tl.load(w3_cols + (d0 + ds).to(tl.int64)[:, None] * stride_w3, mask=dm[:, None] & cm[None, :],
                         other=0.0)
            y = _product(tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), product, w3, DT, True, F32_DOT)
            tl.store(part + (d0 + ds)[None, :], y, mask=rm[:, None] & dm[None, :])
    if PHASE == 0:
        _grid_barrier(BAR, programs)
    if PHASE != 1:
        # BLOCK_C output columns at a time, all rows, flattened: the partials of PARTS programs per load
        e = tl.arange(0, BLOCK_M * BLOCK_C)
        e_row = e // BLOCK_C
        ps = tl.arange(0, PARTS)
        for c0 in range(pid * BLOCK_C, D, programs * BLOCK_C):
            e_col = c0 + e % BLOCK_C
            em = (e_row < M) & (e_col < D)
            at = e_row * D + e_col
            acc = tl.zeros([BLOCK_M * BLOCK_C], dtype=tl.float32)
            for p0 in range(0, programs, PARTS):
                pm = p0 + ps < programs
                slots = WS + (p0 + ps).to(tl.int64)[:, None] * BLOCK_M * D + at[None, :]
                acc += tl.sum(tl.load(slots, mask=pm[:, None] & em[None, :], other=0.0, cache_modifier=".cg"), axis=0)
            res = tl.load(X + e_row.to(tl.int64) * stride_x + e_col, mask=em, other=0.0).to(tl.float32)
            y = _round(res + _round(acc, DT, RNE), DT, RNE)
            tl.store(Y + e_row.to(tl.int64) * stride_y + e_col, y.to(DT), mask=em)


BLOCK_F, BLOCK_K, BLOCK_D, BLOCK_C, PARTS, NUM_WARPS = 32, 256, 128, 16, 8, 4


@functools.lru_cache(maxsize=None)
def multiprocessors(index: int) -> int:
    """The SM count of CUDA device ``index`` (asked once per device: the model checks it at every decoding block)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_for(ffn: int) -> int:
    """Phase 1's grid: one program per BLOCK_F columns of the FFN width (88 for the 385M model's 2816)."""
    return triton.cdiv(ffn, BLOCK_F)


# per device: the grid barrier's count and generation (zero at first; the barrier leaves the count at zero)
_BARRIERS = {}


def _barrier(device):
    bar = _BARRIERS.get(device)
    if bar is None:
        bar = _BARRIERS[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return bar


def decode_sglu_triton(x, weight1, weight2, weight3, norm_eps):
    """decode_sglu_reference's value: x [M, D], weight1 and weight2 [F, D], weight3 [D, F]; the checks are
    decode_sglu_applies's (the caller's), but for the grid, checked here: the barrier would never open with
    more programs than the GPU can hold at once."""
    m, d = x.shape
    f = weight1.shape[0]
    if not float(norm_eps) >= 0:
        raise ValueError(f"decode_sglu: norm_eps must be >= 0, got {norm_eps}")
    programs = programs_for(f)
    interp = interpreting()
    if not interp and programs > multiprocessors(x.device.index):
        raise ValueError(f"decode_sglu: {programs} programs for an FFN width of {f} exceed the GPU's "
                         f"{multiprocessors(x.device.index)} SMs: the grid barrier needs them all resident")
    block_m = max(16, triton.next_power_of_2(m))
    y = torch.empty_like(x)
    ws = torch.empty(programs * block_m * d, dtype=torch.float32, device=x.device)
    pdl = pdl_launch(x)
    launch = lambda phase: _sglu_kernel[(programs,)](   # noqa: E731
        x, weight1, weight2, weight3, y, ws, _barrier(x.device), m, d, f, x.stride(0), weight1.stride(0),
        weight2.stride(0), weight3.stride(0), y.stride(0), float(norm_eps),
        RNE=interp and x.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_F=BLOCK_F,
        BLOCK_K=max(16, min(triton.next_power_of_2(d), BLOCK_K)), BLOCK_D=max(16, min(triton.next_power_of_2(d),
                                                                                      BLOCK_D)),
        BLOCK_C=BLOCK_C, PARTS=PARTS, F32_DOT=x.dtype == torch.float32 or interp, PHASE=phase, PDL=pdl,
        num_warps=NUM_WARPS, **({"launch_pdl": True} if pdl else {}))
    if interp:
        launch(1)
        launch(2)
    else:
        launch(0)
    return y


__all__ = ["decode_sglu_triton", "multiprocessors", "programs_for"]
