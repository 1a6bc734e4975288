"""decode_linear in one Triton kernel: a GEMV for a few rows with the layer's neighbours folded in.

Why: a CUDA-graph decode step of the 385M model at batch 1 ran 320 kernels per token, 13 per layer; its linear
layers were cuBLAS GEMVs reaching ~1.8 TB/s on 2-8 MB weights, and between them sat a norm kernel, a gate kernel,
a product and two adds per layer, each a launch and a gap. Here each linear layer is one kernel that also does
what the model does right before or after it:

* the prologue normalises the row (SRMSNorm, fp32 sum of squares, the normalised value rounded to the input dtype)
  and multiplies by the gate (GLA's o -> srms_norm(o) * u), on the fly, tile by tile of K;
* SGLU's two matrices are read in the same K loop and their product is formed in the epilogue;
* the epilogue adds the residual.

One program per BLOCK_N output columns, all rows at once (the weight tile is read once for every row): the
weights are read from memory once per token, which is the floor of the step. Roundings follow the model's
composition (each op's result rounded to the dtype), so the kernel differs from it only by the order of the fp32
sums. Two forms of the product, the tiles choose (_tiles, decode_linear_triton's ``tiles``):

* broadcast products summed in fp32 (``tl.sum(h[:, None, :] * w[None, :, :])``), for 1-4 rows: its cost grows with
  the rows (on an H200 one 385M block took 4x one row's time at 8 rows, 11x at 16);
* ``tl.dot`` on tensor cores for 5-16 rows (rows padded to 16, fp32 accumulation; fp32 tensors as fp32 products,
  not tf32): the same weight bytes for a dozen rows as for one (a block at 16 rows: 20.8 us, a third of cuBLAS's
  with the neighbour kernels). Timed on an H200 by benchmarks/decode_linear_tiles.py, checked against the
  composition on that GPU and in the CPU interpreter (which upcasts the operands). An earlier tl.dot form for 9-16
  rows, never swept (16 columns and 128 of K a program, 4 warps), made the 385M decode step at batch 16 slower than
  cuBLAS with separate kernels around it and was dropped.

K may be split over programs (``tiles``' optional sixth element, split_k): each program sums its part of K, the
last of a column tile to arrive adds the parts in K order and runs the epilogue. _tiles splits it for narrow
layers at 5-16 rows (W_o and W_3 had 64 programs of 16 columns: 0.4 and 1.2 TB/s at 16 rows, too few loads in
flight).

Nothing allocates by value or reads back to the host: CUDA graphs capture it. On sm_90+ it launches with
programmatic dependent launch (gla_decode.triton_step.pdl_launch): each program loads its first weight tiles, which
no kernel writes, before it waits for the kernel before it, so the weights of the next layer stream in while the
previous one finishes; where its K spans more tiles (the tl.dot form) it also asks L2 for the rest of its weights
there (``prefetch.global.L2``, no registers held), so its K loop after the wait reads L2 instead of HBM.

The norm's sum of squares: a program needs its rows' whole sums of squares before its first product, and reading the
rows once more for them cost ~80 us of the 385M decode step at 16 rows on an H200 (the rows come from L2, but in 4-8
loads one after the other, after the wait). So the kernel that writes a norm's input also hands on its rows' sums of
squares in parts, one per program (``with_sumsq``: this kernel's epilogue, one part per column tile;
gla_decode's step kernel, one per head and column tile), and the norm sums the parts in one load (``x_sumsq``). The
parts are of the stored (rounded) values in fp32, so the norm differs from the composition's by the order of fp32
sums only. In one process on an H200 (benchmarks/RESULTS.md, fourteenth session), the decode step with both against
neither: 0.729 against 0.786 ms a token at 16 rows, 0.661 against 0.724 at 8, 0.659 against 0.687 at 4 (the parts
only: one K tile a program there), 0.465 against 0.464 at 1.
"""
import torch
import triton
import triton.language as tl

from .._interpreter import interpreting
from .._l2 import prefetch_l2
from ..gla_decode.triton_step import _pdl_handoff, _round, pdl_launch


@triton.jit
def _product(acc, h, w, DT: tl.constexpr, DOT: tl.constexpr, F32_DOT: tl.constexpr):
    """acc + h @ w^T in fp32: h [BLOCK_M, BLOCK_K] fp32 holding values of DT (rounded as the composition rounds
    them), w [BLOCK_N, BLOCK_K] in DT, acc [BLOCK_M, BLOCK_N] fp32."""
    if DOT:
        if F32_DOT:     # fp32 tensors (ieee: the composition's fp32 products), and the interpreter, whose dot is
            # wrong on 16-bit operands: h's rounded values and w upcast give the 16-bit products exactly
            return tl.dot(h, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:           # h.to(DT) is exact: h holds DT's values
            return tl.dot(h.to(DT), tl.trans(w), acc)
    else:
        return acc + tl.sum(h[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _weight_tiles(w1_cols, w2_cols, cm, k0, ks, K, GLU: tl.constexpr):
    """The weight tiles of the K tile from k0 (w2's only with GLU; otherwise w1 stands in, unread)."""
    wm = cm[:, None] & (k0 + ks < K)[None, :]
    w1 = tl.load(w1_cols + (k0 + ks)[None, :], mask=wm, other=0.0)
    w2 = w1
    if GLU:
        w2 = tl.load(w2_cols + (k0 + ks)[None, :], mask=wm, other=0.0)
    return w1, w2


@triton.jit
def _prefetch_to_l2(W, w_cols, cm, k_from, k_hi, BLOCK_K: tl.constexpr, STEP: tl.constexpr):
    """Ask L2 for this program's weights in K [k_from, k_hi), one ``prefetch.global.L2`` per STEP elements (a 128-byte
    line, or the whole tile if narrower): nothing comes into registers, and the loads of the K loop after the wait
    find the weights in L2 instead of going to HBM one tile at a time. Lanes past N or K ask for W's first line (a
    prefetch needs an address inside the tensor)."""
    at_k = tl.arange(0, BLOCK_K // STEP) * STEP
    for k0 in range(k_from, k_hi, BLOCK_K):
        inside = cm[:, None] & (k0 + at_k < k_hi)[None, :]
        prefetch_l2(tl.where(inside, w_cols + (k0 + at_k)[None, :], W))


@triton.jit
def _accumulate_tile(acc1, acc2, w1, w2, x_rows, g_rows, k0, ks, rm, K, r, DT: tl.constexpr, NORM: tl.constexpr,
                     GATE: tl.constexpr, GLU: tl.constexpr, RNE: tl.constexpr, DOT: tl.constexpr,
                     F32_DOT: tl.constexpr):
    """One K tile from k0: the rows there (normalised by r, then gated, each rounded to DT as the composition
    rounds), times the weight tiles w1 (and w2 with GLU), added to the accumulators."""
    xm = rm[:, None] & (k0 + ks < K)[None, :]
    h = tl.load(x_rows + (k0 + ks)[None, :], mask=xm, other=0.0).to(tl.float32)
    if NORM:
        h = _round(h * r[:, None], DT, RNE)
    if GATE:
        g = tl.load(g_rows + (k0 + ks)[None, :], mask=xm, other=0.0)
        h = _round(h * g.to(tl.float32), DT, RNE)
    acc1 = _product(acc1, h, w1, DT, DOT, F32_DOT)
    if GLU:
        acc2 = _product(acc2, h, w2, DT, DOT, F32_DOT)
    return acc1, acc2


@triton.jit
def _gemv_kernel(X, G, W1, W2, R, Y, WS, CNT, SSQ_IN, SSQ_OUT, M, N, K, K_SPLIT, SSQ_IN_PARTS, stride_x, stride_g,
                 stride_w1, stride_w2, stride_r, stride_y, eps, NORM: tl.constexpr, GATE: tl.constexpr,
                 GLU: tl.constexpr, RESIDUAL: tl.constexpr, RNE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, F32_DOT: tl.constexpr,
                 SPLIT_K: tl.constexpr, PDL: tl.constexpr, SSQ_IN_BLOCK: tl.constexpr, SSQ_OUT_ON: tl.constexpr,
                 PREFETCH: tl.constexpr):
    DT = Y.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    ks = tl.arange(0, BLOCK_K)
    # this program's part of K: all of it, or with SPLIT_K the program_id(1)-th K_SPLIT (a multiple of BLOCK_K)
    k_lo = tl.program_id(1) * K_SPLIT
    k_hi = tl.minimum(K, k_lo + K_SPLIT)
    w1_cols = W1 + cols.to(tl.int64)[:, None] * stride_w1
    w2_cols = W2 + cols.to(tl.int64)[:, None] * stride_w2
    # the first K tile of the weights before waiting for the previous kernel (nothing in a decode step writes
    # weights); the loop below loads each later tile itself. Own names: a tile assigned before the loop and again
    # in it would be carried from step to step.
    w1_first, w2_first = _weight_tiles(w1_cols, w2_cols, cm, k_lo, ks, k_hi, GLU)
    if PREFETCH:    # the rest of this program's weights into L2, also before the wait
        STEP: tl.constexpr = min(BLOCK_K, 1024 // W1.dtype.element_ty.primitive_bitwidth)
        _prefetch_to_l2(W1, w1_cols, cm, k_lo + BLOCK_K, k_hi, BLOCK_K, STEP)
        if GLU:
            _prefetch_to_l2(W2, w2_cols, cm, k_lo + BLOCK_K, k_hi, BLOCK_K, STEP)
    _pdl_handoff(PDL)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    g_rows = G + rows.to(tl.int64)[:, None] * stride_g
    r = 1.0     # read with NORM only
    if NORM and SSQ_IN_BLOCK > 0:   # the rows' sums of squares in parts, from the kernel that wrote them: one load
        parts = tl.arange(0, SSQ_IN_BLOCK)
        ssq = tl.load(SSQ_IN + rows[:, None] * SSQ_IN_PARTS + parts[None, :],
                      mask=rm[:, None] & (parts < SSQ_IN_PARTS)[None, :], other=0.0)
        r = tl.rsqrt(tl.sum(ssq, axis=1) / K + eps)
    elif NORM:    # every program reads its rows whole once more for the norm: K values, from L2, against N/BLOCK_N
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_rows + (k0 + ks)[None, :], mask=rm[:, None] & (k0 + ks < K)[None, :], other=0.0)
            xk = xk.to(tl.float32)
            ss += tl.sum(xk * xk, axis=1)
        r = tl.rsqrt(ss / K + eps)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1, acc2 = _accumulate_tile(acc1, acc2, w1_first, w2_first, x_rows, g_rows, k_lo, ks, rm, k_hi, r, DT, NORM,
                                  GATE, GLU, RNE, DOT, F32_DOT)
    for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        w1, w2 = _weight_tiles(w1_cols, w2_cols, cm, k0, ks, k_hi, GLU)
        acc1, acc2 = _accumulate_tile(acc1, acc2, w1, w2, x_rows, g_rows, k0, ks, rm, k_hi, r, DT, NORM, GATE, GLU,
                                      RNE, DOT, F32_DOT)
    om = rm[:, None] & cm[None, :]
    if SPLIT_K > 1:
        last, acc1, acc2 = _sum_split_k(acc1, acc2, WS, CNT, rows, cols, cm, N, BLOCK_M, SPLIT_K, GLU)
        if last:
            _epilogue(acc1, acc2, R, Y, SSQ_OUT, rows, rm, cols, om, stride_r, stride_y, DT, GLU, RESIDUAL, RNE,
                      SSQ_OUT_ON)
    else:
        _epilogue(acc1, acc2, R, Y, SSQ_OUT, rows, rm, cols, om, stride_r, stride_y, DT, GLU, RESIDUAL, RNE, SSQ_OUT_ON)


@triton.jit
def _sum_split_k(acc1, acc2, WS, CNT, rows, cols, cm, N, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr,
                 GLU: tl.constexpr):
    """Split K: each of a column tile's SPLIT_K programs writes its fp32 sums to WS [(2 with GLU) x SPLIT_K, BLOCK_M,
    N] and counts itself in CNT[tile]; the last to arrive adds the SPLIT_K parts in their K order (the same sums
    whichever program is last) and resets the count for the next launch. Returns (whether this program is the last,
    the sums). Why: at 8-16 rows a layer of 1024 outputs is 64 programs of 16 columns for 132 SMs, too few loads in
    flight to stream its weights (0.4 TB/s for W_o at 16 rows on an H200, benchmarks/RESULTS.md)."""
    pid_k = tl.program_id(1)
    at = (rows.to(tl.int64)[:, None] + pid_k * BLOCK_M) * N + cols[None, :]
    tl.store(WS + at, acc1, mask=cm[None, :])
    if GLU:
        tl.store(WS + SPLIT_K * BLOCK_M * N + at, acc2, mask=cm[None, :])
    # every thread's parts stored before the count (the barrier), the count a release and an acquire at GPU scope:
    # the last program's loads below see every part
    tl.debug_barrier()
    arrived = tl.atomic_add(CNT + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    if last:
        acc1 = tl.zeros_like(acc1)
        acc2 = tl.zeros_like(acc2)
        for part in tl.static_range(SPLIT_K):
            here = (rows.to(tl.int64)[:, None] + part * BLOCK_M) * N + cols[None, :]
            acc1 += tl.load(WS + here, mask=cm[None, :], other=0.0, cache_modifier=".cg")
            if GLU:
                acc2 += tl.load(WS + SPLIT_K * BLOCK_M * N + here, mask=cm[None, :], other=0.0, cache_modifier=".cg")
        tl.store(CNT + tl.program_id(0), 0)
    return last, acc1, acc2


@triton.jit
def _epilogue(acc1, acc2, R, Y, SSQ_OUT, rows, rm, cols, om, stride_r, stride_y, DT: tl.constexpr, GLU: tl.constexpr,
              RESIDUAL: tl.constexpr, RNE: tl.constexpr, SSQ_OUT_ON: tl.constexpr):
    """The sums rounded to DT, SGLU's product, the residual added, each rounded as the composition rounds; stored.
    With SSQ_OUT_ON also this column tile's part of each row's sum of squares (of the stored values, in fp32) into
    SSQ_OUT [M, column tiles]: the next kernel's norm then sums the parts instead of reading the rows again."""
    y = _round(acc1, DT, RNE)
    if GLU:
        y = _round(y * _round(acc2, DT, RNE), DT, RNE)
    if RESIDUAL:
        res = tl.load(R + rows.to(tl.int64)[:, None] * stride_r + cols[None, :], mask=om, other=0.0)
        y = _round(res.to(tl.float32) + y, DT, RNE)
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(DT), mask=om)
    if SSQ_OUT_ON:
        tl.store(SSQ_OUT + rows * tl.num_programs(0) + tl.program_id(0), tl.sum(tl.where(om, y * y, 0.0), axis=1),
                 mask=rm)


DOT_FROM_ROWS = 5       # from this many rows the product runs as tl.dot (see _tiles)


def _tiles(m: int, n: int, k: int, glu: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, dot[, split_k]): the tiles and the form of the product (dot: tl.dot on
    tensor cores, else broadcast products summed in fp32; split_k: K over that many programs; see the module
    docstring). From sweeps of benchmarks/decode_linear_tiles.py on an H200 (385M shapes, bf16, 2026-11-29/30;
    benchmarks/RESULTS.md), each rule within 5% of the sweep's best for each of a block's four layers:

    * 1 row: 8 columns a program (4 with SGLU's pair), 2048 of K a step (1024 with the pair), 128 products a thread
      (third sweep: 12.2 us a block against 14.3 for the second sweep's 4 columns x 64 products); K split into its
      2048-wide parts where it has several (W_3: 2 programs a column tile; inside the decode step 0.464 against 0.509
      ms a token, twelfth session);
    * 2-4 rows: 4 columns (2 with the pair), 1024 of K, 128 products a thread (second sweep); at 3-4 rows 2 warps
      (256 products a thread) and K split into its 1024-wide tiles where it has several (W_3), 4 warps there: swept
      inside the decode step (benchmarks/decode_tiles_in_step.py, twelfth session), 0.670 ms a token at 4 rows
      against 0.748 with 4 warps and K whole (W_3's split alone -49 us);
    * 5-16 rows, tl.dot: rows padded to 16, 32 columns a program; for layers of at least 2048 outputs 256 of K a
      step and 4 warps (20.8 us a block at 16 rows against 66.1 for cuBLAS with the norm, gate, product and add
      kernels around it, and 131 for the broadcast form); narrower layers (W_o, W_3: 32 programs) split K in 4
      parts, 128 of K a step and 8 warps up to K = 1024, else 256 and 4 (tenth session's sweep: W_o 4.92 -> 4.12
      us, W_3 4.78 -> 3.81 at 16 rows, against 16 columns unsplit; a block 18.7 us).

    Those sweeps repeated a layer on one copy of its weights, in L2. Swept again with the weights read from HBM as in
    a decode (eleventh session, 8 and 16 rows, K also split over 8): these tiles stay within 3% of the best per
    block (22.2 us against 22.1 at 16 rows).
    """
    two = 2 if glu else 1       # SGLU's pair: two weight tiles per step of K
    if m >= DOT_FROM_ROWS:
        block_m = max(16, triton.next_power_of_2(m))
        if n >= 2048:
            return block_m, 32, max(16, min(triton.next_power_of_2(k), 256)), 4, True
        block_k, num_warps = (128, 8) if k <= 1024 else (256, 4)
        return block_m, 32, max(16, min(triton.next_power_of_2(k), block_k)), num_warps, True, 4
    block_m = max(1, triton.next_power_of_2(m))
    if block_m == 1:
        block_n, block_k = 8 // two, 2048 // two
    else:
        block_n, block_k = 4 // two, 1024
    block_k = max(16, min(triton.next_power_of_2(k), block_k))
    # 1 and 3-4 rows (swept inside the decode step; 2 rows was not): K over its BLOCK_K tiles where it spans several
    split_k = 1 if block_m == 2 else min(8, triton.cdiv(k, block_k))
    split = (split_k,) if split_k > 1 else ()
    if block_m == 4:        # 3-4 rows: 2 warps, 4 with K split
        return (block_m, block_n, block_k, 4 if split_k > 1 else 2, False) + split
    num_warps = max(2, min(8, block_m * block_n * block_k * two // (32 * 128)))
    return (block_m, block_n, block_k, triton.next_power_of_2(num_warps), False) + split


# per device: one count per column tile for the split-K programs (_sum_split_k), zero between launches (the last
# program of each tile resets its own). Kept, not allocated per call: a fresh zeroed buffer would be a memset launch.
# The decode kernels run one after the other on one stream; two split-K launches at once on one device would share it.
_SPLIT_K_COUNTS = {}


def _split_k_counts(device, tiles):
    counts = _SPLIT_K_COUNTS.get(device)
    if counts is None or counts.numel() < tiles:
        counts = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _SPLIT_K_COUNTS[device] = counts
    return counts


def decode_linear_triton(x, weight, norm_eps=None, gate=None, weight2=None, residual=None, tiles=None,
                         x_sumsq=None, with_sumsq=False):
    """Same contract as decode_linear_reference; the checks are decode_linear_applies's (the caller's).
    ``x_sumsq``: [B, parts] fp32, x's rows' sums of squares in parts (what the kernel that wrote x returned with
    ``with_sumsq``); the norm sums them instead of reading x's rows a second time. ``with_sumsq``: return (y, y's
    rows' sums of squares in parts, one per column tile [B, N / BLOCK_N] fp32).
    ``tiles``: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, dot[, split_k[, num_stages]]) instead of _tiles's choice
    (benchmarks sweep them; the kernel tests pass the GPU's tiles to the interpreter, which otherwise takes 16 columns
    a program).
    BLOCK_M at least the rows; with dot, every block at least 16 (tl.dot's smallest tile). split_k (default 1): K
    cut into that many parts of whole BLOCK_K tiles, one program each, summed by the last (_sum_split_k).
    num_stages: the depth of Triton's software pipeline over the K loop (default: Triton's, 3 on sm_90)."""
    m, k = x.shape
    n = weight.shape[0]
    if norm_eps is not None and not float(norm_eps) >= 0:
        raise ValueError(f"decode_linear: norm_eps must be >= 0, got {norm_eps}")
    interp = interpreting()
    if tiles is None:
        tiles = _tiles(m, n, k, weight2 is not None)
        if interp:      # the CPU interpreter runs programs one by one in Python: fewer, wider ones there
            tiles = (tiles[0], max(tiles[1], 16)) + tuple(tiles[2:])
    block_m, block_n, block_k, num_warps, dot = tiles[:5]
    split_k = tiles[5] if len(tiles) > 5 else 1
    stages = {"num_stages": tiles[6]} if len(tiles) > 6 else {}       # else Triton's default
    if block_m < m:
        raise ValueError(f"decode_linear: BLOCK_M {block_m} < {m} rows")
    if dot and min(block_m, block_n, block_k) < 16:
        raise ValueError(f"decode_linear: tl.dot takes tiles of at least 16, got {tiles}")
    if not (isinstance(split_k, int) and split_k >= 1):
        raise ValueError(f"decode_linear: split_k must be an int >= 1, got {split_k!r} in tiles {tiles}")
    k_tiles = triton.cdiv(k, block_k)
    k_split = triton.cdiv(k_tiles, min(split_k, k_tiles)) * block_k     # whole tiles a part, no empty part
    split_k = triton.cdiv(k, k_split)
    col_tiles = triton.cdiv(n, block_n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    any_ = x            # any pointer for the operands a variant does not read
    if split_k > 1:
        ws = torch.empty((2 if weight2 is not None else 1) * split_k * block_m * n, dtype=torch.float32,
                         device=x.device)
        counts = _split_k_counts(x.device, col_tiles)
    else:
        ws = counts = any_
    ssq_in = x_sumsq if norm_eps is not None else None
    ssq_out = torch.empty(m, col_tiles, dtype=torch.float32, device=x.device) if with_sumsq else None
    pdl = pdl_launch(x)
    _gemv_kernel[(col_tiles, split_k)](
        x, gate if gate is not None else any_, weight, weight2 if weight2 is not None else weight,
        residual if residual is not None else any_, y, ws, counts, ssq_in if ssq_in is not None else any_,
        ssq_out if ssq_out is not None else any_, m, n, k, k_split, ssq_in.shape[1] if ssq_in is not None else 0,
        x.stride(0), gate.stride(0) if gate is not None else 0, weight.stride(0),
        weight2.stride(0) if weight2 is not None else 0, residual.stride(0) if residual is not None else 0,
        y.stride(0), float(norm_eps) if norm_eps is not None else 0.0,
        NORM=norm_eps is not None, GATE=gate is not None, GLU=weight2 is not None, RESIDUAL=residual is not None,
        RNE=interp and x.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT=bool(dot), F32_DOT=x.dtype == torch.float32 or interp, SPLIT_K=split_k, PDL=pdl,
        PREFETCH=pdl and triton.cdiv(k_split, block_k) > 1,
        SSQ_IN_BLOCK=triton.next_power_of_2(ssq_in.shape[1]) if ssq_in is not None else 0,
        SSQ_OUT_ON=ssq_out is not None,
        num_warps=4 if interp else num_warps, **stages, **({"launch_pdl": True} if pdl else {}))
    return (y, ssq_out) if with_sumsq else y


__all__ = ["decode_linear_triton"]
