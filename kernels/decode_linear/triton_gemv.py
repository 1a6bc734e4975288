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

Nothing allocates by value or reads back to the host: CUDA graphs capture it. On sm_90+ it launches with
programmatic dependent launch (gla_decode.triton_step.pdl_launch): each program loads its first weight tiles, which
no kernel writes, before it waits for the kernel before it, so the weights of the next layer stream in while the
previous one finishes.
"""
import torch
import triton
import triton.language as tl

from .._interpreter import interpreting
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
def _gemv_kernel(X, G, W1, W2, R, Y, M, N, K, stride_x, stride_g, stride_w1, stride_w2, stride_r, stride_y, eps,
                 NORM: tl.constexpr, GATE: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr,
                 RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr):
    DT = Y.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    ks = tl.arange(0, BLOCK_K)
    w1_cols = W1 + cols.to(tl.int64)[:, None] * stride_w1
    w2_cols = W2 + cols.to(tl.int64)[:, None] * stride_w2
    # the first K tile of the weights before waiting for the previous kernel (nothing in a decode step writes
    # weights); the loop below loads each later tile itself. Own names: a tile assigned before the loop and again
    # in it would be carried from step to step.
    w1_first, w2_first = _weight_tiles(w1_cols, w2_cols, cm, 0, ks, K, GLU)
    _pdl_handoff(PDL)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    g_rows = G + rows.to(tl.int64)[:, None] * stride_g
    r = 1.0     # read with NORM only
    if NORM:    # every program reads its rows whole once more for the norm: K values, from L2, against N/BLOCK_N
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_rows + (k0 + ks)[None, :], mask=rm[:, None] & (k0 + ks < K)[None, :], other=0.0)
            xk = xk.to(tl.float32)
            ss += tl.sum(xk * xk, axis=1)
        r = tl.rsqrt(ss / K + eps)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1, acc2 = _accumulate_tile(acc1, acc2, w1_first, w2_first, x_rows, g_rows, 0, ks, rm, K, r, DT, NORM, GATE,
                                  GLU, RNE, DOT, F32_DOT)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w1, w2 = _weight_tiles(w1_cols, w2_cols, cm, k0, ks, K, GLU)
        acc1, acc2 = _accumulate_tile(acc1, acc2, w1, w2, x_rows, g_rows, k0, ks, rm, K, r, DT, NORM, GATE, GLU,
                                      RNE, DOT, F32_DOT)
    y = _round(acc1, DT, RNE)
    if GLU:
        y = _round(y * _round(acc2, DT, RNE), DT, RNE)
    om = rm[:, None] & cm[None, :]
    if RESIDUAL:
        res = tl.load(R + rows.to(tl.int64)[:, None] * stride_r + cols[None, :], mask=om, other=0.0)
        y = _round(res.to(tl.float32) + y, DT, RNE)
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(DT), mask=om)


DOT_FROM_ROWS = 5       # from this many rows the product runs as tl.dot (see _tiles)


def _tiles(m: int, n: int, k: int, glu: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, dot): the tiles and the form of the product (dot: tl.dot on tensor
    cores, else broadcast products summed in fp32; see the module docstring). From sweeps of
    benchmarks/decode_linear_tiles.py on an H200 (385M shapes, bf16, 2026-11-29/30; benchmarks/RESULTS.md), each rule
    within 5% of the sweep's best for each of a block's four layers:

    * 1 row: 8 columns a program (4 with SGLU's pair), 2048 of K a step (1024 with the pair), 128 products a thread
      (third sweep: 12.2 us a block against 14.3 for the second sweep's 4 columns x 64 products);
    * 2-4 rows: 4 columns (2 with the pair), 1024 of K, 128 products a thread (second sweep);
    * 5-16 rows, tl.dot: rows padded to 16, 256 of K a step, 4 warps, 32 columns a program for layers of at least
      2048 outputs and 16 for narrower ones (at least 64 programs for the 132 SMs): 20.8 us a block at 16 rows
      against 66.1 for cuBLAS with the norm, gate, product and add kernels around it, and 131 for the broadcast form.
    """
    two = 2 if glu else 1       # SGLU's pair: two weight tiles per step of K
    if m >= DOT_FROM_ROWS:
        block_k = max(16, min(triton.next_power_of_2(k), 256))
        return max(16, triton.next_power_of_2(m)), 32 if n >= 2048 else 16, block_k, 4, True
    block_m = max(1, triton.next_power_of_2(m))
    if block_m == 1:
        block_n, block_k = 8 // two, 2048 // two
    else:
        block_n, block_k = 4 // two, 1024
    block_k = max(16, min(triton.next_power_of_2(k), block_k))
    num_warps = max(2, min(8, block_m * block_n * block_k * two // (32 * 128)))
    return block_m, block_n, block_k, triton.next_power_of_2(num_warps), False


def decode_linear_triton(x, weight, norm_eps=None, gate=None, weight2=None, residual=None, tiles=None):
    """Same contract as decode_linear_reference; the checks are decode_linear_applies's (the caller's).
    ``tiles``: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, dot) instead of _tiles's choice (benchmarks sweep them; the
    kernel tests pass the GPU's tiles to the interpreter, which otherwise takes 16 columns a program). BLOCK_M at
    least the rows; with dot, every block at least 16 (tl.dot's smallest tile)."""
    m, k = x.shape
    n = weight.shape[0]
    if norm_eps is not None and not float(norm_eps) >= 0:
        raise ValueError(f"decode_linear: norm_eps must be >= 0, got {norm_eps}")
    interp = interpreting()
    if tiles is None:
        tiles = _tiles(m, n, k, weight2 is not None)
        if interp:      # the CPU interpreter runs programs one by one in Python: fewer, wider ones there
            tiles = (tiles[0], max(tiles[1], 16)) + tuple(tiles[2:])
    block_m, block_n, block_k, num_warps, dot = tiles
    if block_m < m:
        raise ValueError(f"decode_linear: BLOCK_M {block_m} < {m} rows")
    if dot and min(block_m, block_n, block_k) < 16:
        raise ValueError(f"decode_linear: tl.dot takes tiles of at least 16, got {tiles}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    any_ = x            # any pointer for the operands a variant does not read
    pdl = pdl_launch(x)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, gate if gate is not None else any_, weight, weight2 if weight2 is not None else weight,
        residual if residual is not None else any_, y, m, n, k,
        x.stride(0), gate.stride(0) if gate is not None else 0, weight.stride(0),
        weight2.stride(0) if weight2 is not None else 0, residual.stride(0) if residual is not None else 0,
        y.stride(0), float(norm_eps) if norm_eps is not None else 0.0,
        NORM=norm_eps is not None, GATE=gate is not None, GLU=weight2 is not None, RESIDUAL=residual is not None,
        RNE=interp and x.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT=bool(dot), F32_DOT=x.dtype == torch.float32 or interp, PDL=pdl,
        num_warps=4 if interp else num_warps, **({"launch_pdl": True} if pdl else {}))
    return y


__all__ = ["decode_linear_triton"]
