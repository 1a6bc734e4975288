"""decode_embedding in one Triton kernel: the embedding rows of a decoding step's tokens, times the embedding scale.

Why: the model's composition (nn.Embedding, then ``* embed_scale``) is two kernels a token, and torch's row gather
for a handful of ids (indexSelectSmallIndex) runs few programs: 7.3 us at 16 rows on an H200 against 1.4 for a
plain gather, then 1.1 us for the scale (benchmarks/RESULTS.md, eleventh session). One program per row and
BLOCK_D columns; the product is rounded to the weight's dtype as the composition's multiply rounds it. Launched with
programmatic dependent launch like the decode GEMVs (it reads the token ids, which the host writes before a replay
and the previous step's kernels do not), so the first layer's QKVU loads its weights while this runs.
"""
import torch
import triton
import triton.language as tl

from .._interpreter import interpreting
from ..gla_decode.triton_step import _pdl_handoff, _round, pdl_launch


@triton.jit
def _embedding_kernel(W, T, Y, V, D, stride_w, stride_t, stride_y, scale, RNE: tl.constexpr, BLOCK_D: tl.constexpr,
                      PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    _pdl_handoff(PDL)
    t = tl.load(T + row * stride_t + tl.zeros_like(cols)).to(tl.int64)     # the row's id, in every column
    # an id outside the vocabulary (the model checks ids in forward; a replayed graph does not) gives NaN rows,
    # which finite checks catch, rather than another row or memory outside the table
    w = tl.load(W + t * stride_w + cols, mask=cm & (t >= 0) & (t < V), other=float("nan"))
    y = _round(w.to(tl.float32) * scale, Y.dtype.element_ty, RNE)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=cm)


def decode_embedding_triton(weight, tokens, scale: float = 1.0):
    """Same contract as decode_embedding_reference; the checks are decode_embedding_applies's (the caller's)."""
    v, d = weight.shape
    b = tokens.shape[0]
    y = torch.empty(b, 1, d, dtype=weight.dtype, device=weight.device)
    block_d = min(triton.next_power_of_2(d), 2048)
    pdl = pdl_launch(weight)
    _embedding_kernel[(b, triton.cdiv(d, block_d))](
        weight, tokens, y, v, d, weight.stride(0), tokens.stride(0), y.stride(0), float(scale),
        RNE=interpreting() and weight.dtype == torch.bfloat16, BLOCK_D=block_d, PDL=pdl, num_warps=4,
        **({"launch_pdl": True} if pdl else {}))
    return y


__all__ = ["decode_embedding_triton"]
