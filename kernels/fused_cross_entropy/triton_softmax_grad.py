"""The softmax cross entropy of a chunk of logits and its gradient, written over the logits, in one Triton kernel.

Why: chunked.py's PyTorch form makes about ten full passes over each [rows, vocab] chunk of logits (upcast to fp32,
gather, amax, sub_/exp_, sum, div_, scatter_add_, masked_fill_, mul_, downcast), each a kernel that reads and most
that write the whole chunk, plus an fp32 copy of a bf16 chunk: ~10-15 ms of a 142 ms training step at vocab 64000.
Here one program per row reads its row twice (max and sum of exp, online over BLOCK_V tiles; then the gradient) and
writes it once, in the logits' dtype, in place.

The math is fp32 whatever the logits' dtype, as after the PyTorch form's upcast, and the gradient is rounded once
to the logits' dtype as its final ``.to(h.dtype)`` does: the same numbers up to the order of the fp32 sums.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._interpreter import interpreting
from ..gla_decode.triton_step import _exp

# Columns per tile (fewer when the vocab is smaller), with 4 warps. On an H200 at 4096 x 64000 bf16 this pair was
# the fastest of BLOCK_V 2048/4096/8192 x 4/8/16 warps: 0.43 ms with the gradient (3.7 TB/s over 2 reads and
# 1 write), 0.17 ms for the losses alone; the PyTorch form took 4.4 ms of the chunk pass (5.1 ms with its matmul).
BLOCK_V = 4096
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# On the GPU libdevice's exp (gla_decode's _exp) and log, the accurate ones torch's kernels use (tl.exp is the
# approximate ex2 scaled: on an H200 it gave the same error against float64 here, 2e-8 in fp32, and a 7% faster
# kernel; kept out of caution). The interpreter has no libdevice, and its tl.exp/tl.log are numpy's, accurate already.
@triton.jit
def _log(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _softmax_ce_kernel(Z, TARGET, SCALE, LOSS, V, stride_z, stride_scale, ignore_index,
                       WANT_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, LIBDEVICE: tl.constexpr,
                       RNE_BY_HAND: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(TARGET + row)
    ignored = target == ignore_index
    # pass 1: running max m and s = sum exp(z - m). A scalar max per tile (s rescaled when a tile raises it) costs
    # one exp per element; lane-wise running maxima would cost two.
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        z = tl.load(z_row + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * _exp(m - m_new, LIBDEVICE) + tl.sum(_exp(z - m_new, LIBDEVICE), axis=0)
        m = m_new
    # an out-of-range target reads nothing and gives a NaN loss: visible, with no check that syncs with the host
    valid = (target >= 0) & (target < V)
    z_target = tl.load(z_row + tl.where(valid, target, 0)).to(tl.float32)
    loss = tl.where(valid, m + _log(s, LIBDEVICE) - z_target, float("nan"))
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss))
    if WANT_GRAD:
        if HAS_SCALE:
            scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
        else:
            scale = 1.0
        inv_s = 1.0 / s
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            z = tl.load(z_row + c, mask=c < V, other=0.0).to(tl.float32)
            g = _exp(z - m, LIBDEVICE) * inv_s
            g = tl.where(c == target, g - 1.0, g) * scale
            g = tl.where(ignored, 0.0, g)
            if RNE_BY_HAND:
                # the interpreter's fp32 -> bf16 cast truncates (and garbles fp32 subnormals), the GPU's rounds to
                # nearest even: round on the bits here and store the top half, so the CPU tests see the GPU's numbers
                bits = g.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                tl.store(z_row + c, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=c < V)
            else:
                tl.store(z_row + c, g.to(Z.dtype.element_ty), mask=c < V)


def softmax_cross_entropy_grad_(logits, target, ignore_index: int, want_grad: bool, row_scale=None, block_v=None):
    """losses [rows] (fp32) of the rows of ``logits`` [rows, V] (fp32/bf16/fp16, last dim contiguous) against
    ``target`` [rows] (int; ``ignore_index`` rows count 0). With ``want_grad`` the logits are overwritten, in their
    dtype, by the gradient of sum(losses * row_scale) (row_scale [rows] or None for ones): softmax - onehot(target),
    times the row's scale, 0 on ignored rows."""
    if logits.dtype not in _DTYPES or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"softmax_cross_entropy_grad_: logits [rows, V] of float32/bfloat16/float16 with a "
                         f"contiguous last dim expected, got {logits.dtype} {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if target.shape != (rows,) or target.dtype.is_floating_point:
        raise ValueError(f"softmax_cross_entropy_grad_: integer target [{rows}] expected, got {target.dtype} "
                         f"{tuple(target.shape)}")
    if row_scale is not None and row_scale.shape != (rows,):
        raise ValueError(f"softmax_cross_entropy_grad_: row_scale [{rows}] expected, got {tuple(row_scale.shape)}")
    if any(t.device != logits.device for t in (target, row_scale) if t is not None):
        raise ValueError("softmax_cross_entropy_grad_: every tensor must be on the logits' device")
    if logits.device.type != "cuda" and not interpreting():
        raise ValueError(f"softmax_cross_entropy_grad_: needs CUDA tensors, got {logits.device}")
    if vocab == 0:
        raise ValueError("softmax_cross_entropy_grad_: no classes (vocab 0)")
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses
    target = target.contiguous()
    scale = losses if row_scale is None else row_scale.float()      # any pointer when unused
    block = block_v or min(BLOCK_V, triton.next_power_of_2(vocab))
    _softmax_ce_kernel[(rows,)](
        logits, target, scale, losses, vocab, logits.stride(0), scale.stride(0), int(ignore_index),
        WANT_GRAD=bool(want_grad), HAS_SCALE=row_scale is not None, LIBDEVICE=not interpreting(),
        RNE_BY_HAND=interpreting() and logits.dtype == torch.bfloat16, BLOCK_V=block,
        num_warps=4)
    return losses


__all__ = ["BLOCK_V", "softmax_cross_entropy_grad_"]
