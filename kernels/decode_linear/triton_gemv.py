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
sums. A few rows (decode_linear.MAX_ROWS), as broadcast products summed in fp32 (a tl.dot form for 16 rows was
slower on an H200 than cuBLAS's GEMMs with separate kernels around them, and was dropped). Nothing allocates by
value or reads back to the host: CUDA graphs capture it. On sm_90+ it launches with programmatic dependent launch
(gla_decode.triton_step.pdl_launch): each program loads its first weight tiles, which no kernel writes, before it
waits for the kernel before it, so the weights of the next layer stream in while the previous one finishes.
"""
import torch
import triton
import triton.language as tl

from ..gla_decode.triton_step import _interpreting, _pdl_handoff, _round, pdl_launch


@triton.jit
def _gemv_kernel(X, G, W1, W2, R, Y, M, N, K, stride_x, stride_g, stride_w1, stride_w2, stride_r, stride_y, eps,
                 NORM: tl.constexpr, GATE: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr,
                 RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr):
    DT = Y.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    rm = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    ks = tl.arange(0, BLOCK_K)
    w1_cols = W1 + cols.to(tl.int64)[:, None] * stride_w1
    w2_cols = W2 + cols.to(tl.int64)[:, None] * stride_w2
    # the first K tile of the weights before waiting for the previous kernel (nothing in a decode step writes
    # weights); each step of the loop below then loads the tile after the one it multiplies
    wm = cm[:, None] & (ks < K)[None, :]
    w1 = tl.load(w1_cols + ks[None, :], mask=wm, other=0.0)
    w2 = w1
    if GLU:
        w2 = tl.load(w2_cols + ks[None, :], mask=wm, other=0.0)
    _pdl_handoff(PDL)
    x_rows = X + rows.to(tl.int64)[:, None] * stride_x
    if NORM:    # every program reads its rows whole once more for the norm: K values, from L2, against N/BLOCK_N
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_rows + (k0 + ks)[None, :], mask=rm[:, None] & (k0 + ks < K)[None, :], other=0.0)
            xk = xk.to(tl.float32)
            ss += tl.sum(xk * xk, axis=1)
        r = tl.rsqrt(ss / K + eps)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        km = k0 + ks < K
        xm = rm[:, None] & km[None, :]
        h = tl.load(x_rows + (k0 + ks)[None, :], mask=xm, other=0.0).to(tl.float32)
        if NORM:
            h = _round(h * r[:, None], DT, RNE)
        if GATE:
            g = tl.load(G + rows.to(tl.int64)[:, None] * stride_g + (k0 + ks)[None, :], mask=xm, other=0.0)
            h = _round(h * g.to(tl.float32), DT, RNE)
        acc1 += tl.sum(h[:, None, :] * w1.to(tl.float32)[None, :, :], axis=2)
        if GLU:
            acc2 += tl.sum(h[:, None, :] * w2.to(tl.float32)[None, :, :], axis=2)
        # the next tile (past K on the last step: masked off, no memory read)
        kn = k0 + BLOCK_K + ks
        wm = cm[:, None] & (kn < K)[None, :]
        w1 = tl.load(w1_cols + kn[None, :], mask=wm, other=0.0)
        if GLU:
            w2 = tl.load(w2_cols + kn[None, :], mask=wm, other=0.0)
    y = _round(acc1, DT, RNE)
    if GLU:
        y = _round(y * _round(acc2, DT, RNE), DT, RNE)
    om = rm[:, None] & cm[None, :]
    if RESIDUAL:
        res = tl.load(R + rows.to(tl.int64)[:, None] * stride_r + cols[None, :], mask=om, other=0.0)
        y = _round(res.to(tl.float32) + y, DT, RNE)
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(DT), mask=om)


def _tiles(m: int, n: int, k: int, glu: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps), from two sweeps of benchmarks/decode_linear_tiles.py on an H200 (385M
    shapes, bf16, 2026-11-29; benchmarks/RESULTS.md): few columns per program and K read in wide tiles, with as many
    warps as give each thread 64 (one row) or 128 products of a tile. Within 5% of the sweeps' best for each of a
    block's four layers at 1, 2, 4 and 8 rows; the tiles before it (16 columns, 64-512 of K, 4 warps) took a block
    30% longer at one row and 3.2x at eight."""
    block_m = max(1, triton.next_power_of_2(m))
    two = 2 if glu else 1       # SGLU's pair: two weight tiles per step of K
    if block_m == 1:
        block_n, block_k, per_thread = 4 // two, 2048 // two, 64
    elif block_m <= 4:
        block_n, block_k, per_thread = 4 // two, 1024, 128
    else:
        block_n, block_k, per_thread = 2, 1024 // two, 128
    block_k = max(16, min(triton.next_power_of_2(k), block_k))
    num_warps = max(2, min(8, block_m * block_n * block_k * two // (32 * per_thread)))
    return block_m, block_n, block_k, triton.next_power_of_2(num_warps)


def decode_linear_triton(x, weight, norm_eps=None, gate=None, weight2=None, residual=None, tiles=None):
    """Same contract as decode_linear_reference; the checks are decode_linear_applies's (the caller's).
    ``tiles``: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) instead of _tiles's choice (benchmarks sweep them; the kernel
    tests pass the GPU's tiles to the interpreter, which otherwise takes 16 columns a program)."""
    m, k = x.shape
    n = weight.shape[0]
    if norm_eps is not None and not float(norm_eps) >= 0:
        raise ValueError(f"decode_linear: norm_eps must be >= 0, got {norm_eps}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if tiles is None:
        tiles = _tiles(m, n, k, weight2 is not None)
        if _interpreting():     # the CPU interpreter runs programs one by one in Python: fewer, wider ones there
            tiles = (tiles[0], max(tiles[1], 16), tiles[2], tiles[3])
    block_m, block_n, block_k, num_warps = tiles
    if block_m < m:
        raise ValueError(f"decode_linear: BLOCK_M {block_m} < {m} rows")
    any_ = x            # any pointer for the operands a variant does not read
    pdl = pdl_launch(x)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, gate if gate is not None else any_, weight, weight2 if weight2 is not None else weight,
        residual if residual is not None else any_, y, m, n, k,
        x.stride(0), gate.stride(0) if gate is not None else 0, weight.stride(0),
        weight2.stride(0) if weight2 is not None else 0, residual.stride(0) if residual is not None else 0,
        y.stride(0), float(norm_eps) if norm_eps is not None else 0.0,
        NORM=norm_eps is not None, GATE=gate is not None, GLU=weight2 is not None, RESIDUAL=residual is not None,
        RNE=_interpreting() and x.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PDL=pdl, num_warps=4 if _interpreting() else num_warps, **({"launch_pdl": True} if pdl else {}))
    return y


__all__ = ["decode_linear_triton"]
