"""The LM head and cross entropy in one autograd Function, chunk by chunk over tokens.

For each chunk of rows: logits = h W^T (in the autocast dtype when autocast is on), then in fp32 the rows'
log-sum-exp, the losses lse - z[target], and, in place of the logits, softmax - onehot; its products with W and
with h are the chunk's gradient w.r.t. hidden and its share of the gradient w.r.t. W (summed in fp32). So at most
one chunk's logits exist at a time, and what is kept for backward is the size of hidden and of W, never of the
logits. A summed loss's backward only scales those gradients by the incoming one.

Per-token losses ("none") get a gradient per row, which cannot be applied to W's gradient after the sum over
rows: their backward recomputes each chunk's logits instead (one more pass of the head's matmul), from the
saved hidden and W.

On CUDA (fp32/bf16/fp16 matmuls) the per-chunk softmax, losses and gradient are one Triton kernel over the matmul's
output itself (triton_softmax_grad.py: two reads and one write of the chunk, no fp32 copy of it); elsewhere, and in
float64, the PyTorch form below.
"""
import importlib.util

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK = 4096
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tests set this (with TRITON_INTERPRET=1 before triton_softmax_grad is imported) to run the kernel on CPU tensors
# in Triton's interpreter; otherwise CPU tensors always take the PyTorch form.
interpret_on_cpu = False
# False sends CUDA tensors through the PyTorch form too (to compare the two, or to rule the kernel out).
use_kernel = True


def _compute_dtype(hidden, weight):
    """The matmul's dtype: what autocast would give the LM head's linear layer (float64 is never autocast)."""
    device = hidden.device.type
    if hidden.dtype != torch.float64 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _kernel_applies(h, w) -> bool:
    """Whether _chunk_pass runs the Triton kernel on this chunk: CUDA (or CPU under ``interpret_on_cpu``), a
    matmul in fp32/bf16/fp16."""
    return (use_kernel and _HAS_TRITON and h.dtype in _KERNEL_DTYPES and w.dtype == h.dtype
            and (h.is_cuda or (interpret_on_cpu and h.device.type == "cpu")))


def _chunk_pass(h, w, target, ignore_index, acc, want_grad, row_scale=None):
    """One chunk: losses [rows] in ``acc`` (0 at ignored targets) and, with ``want_grad``, the gradient of their
    sum (rows scaled by ``row_scale`` if given) w.r.t. the logits, in the matmul's dtype (0 at ignored rows)."""
    if _kernel_applies(h, w):
        from .triton_softmax_grad import softmax_cross_entropy_grad_   # a real import error is a bug: let it surface
        z = h @ w.T             # the kernel reads it in its dtype and, with want_grad, writes the gradient over it
        return softmax_cross_entropy_grad_(z, target, ignore_index, want_grad, row_scale), (z if want_grad else None)
    return _chunk_pass_torch(h, w, target, ignore_index, acc, want_grad, row_scale)


def _chunk_pass_torch(h, w, target, ignore_index, acc, want_grad, row_scale=None):
    """_chunk_pass in PyTorch ops (any device and dtype, float64 included)."""
    z = (h @ w.T).to(acc)       # a bf16 product is upcast into a new tensor and freed; an fp32 one is z itself
    ignored = target == ignore_index
    safe = target.masked_fill(ignored, 0)
    z_target = z.gather(1, safe[:, None]).squeeze(1)
    top = z.amax(1, keepdim=True)
    z.sub_(top).exp_()          # in place: no second [rows, vocab] buffer, as logsumexp would allocate
    total = z.sum(1, keepdim=True)
    losses = (top + total.log()).squeeze(1).sub_(z_target).masked_fill_(ignored, 0)
    if not want_grad:
        return losses, None
    z.div_(total)
    z.scatter_add_(1, safe[:, None], z.new_full((z.shape[0], 1), -1.0))
    z.masked_fill_(ignored[:, None], 0)
    if row_scale is not None:
        z.mul_(row_scale[:, None].to(acc))
    return losses, z.to(h.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, reduction, chunk_size, compute_dtype, want_grad):
        acc = torch.promote_types(compute_dtype, torch.float32)
        ctx.reduction, ctx.ignore_index, ctx.chunk_size = reduction, ignore_index, chunk_size
        ctx.compute_dtype, ctx.acc = compute_dtype, acc
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        need_h, need_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        precompute = reduction == "sum" and (need_h or need_w)
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
            grad_h = torch.empty_like(h) if precompute and need_h else None
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if precompute and need_w else None
            losses = torch.empty(h.shape[0], dtype=acc, device=h.device)
            for start in range(0, h.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                losses[rows], g = _chunk_pass(h[rows], w, target[rows], ignore_index, acc, precompute)
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[rows])
                if grad_w is not None:
                    grad_w.add_(g.T @ h[rows])
        if precompute:
            ctx.save_for_backward(grad_h, grad_w)
        elif need_h or need_w:
            ctx.save_for_backward(hidden, weight, target)
        return losses.sum() if reduction == "sum" else losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.reduction == "sum":
            grad_h, grad_w = ctx.saved_tensors
            grad_out = grad_out.to(ctx.acc)
            dh = None if grad_h is None else (grad_h.to(ctx.acc) * grad_out).to(ctx.hidden_dtype)
            dw = None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype)
            return dh, dw, None, None, None, None, None, None
        hidden, weight, target = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(ctx.compute_dtype), weight.to(ctx.compute_dtype)
            dh = torch.empty_like(h) if need_h else None
            dw = torch.zeros(weight.shape, dtype=ctx.acc, device=weight.device) if need_w else None
            for start in range(0, h.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                _, g = _chunk_pass(h[rows], w, target[rows], ctx.ignore_index, ctx.acc, True, grad_out[rows])
                if dh is not None:
                    torch.mm(g, w, out=dh[rows])
                if dw is not None:
                    dw.add_(g.T @ h[rows])
        return (None if dh is None else dh.to(ctx.hidden_dtype), None if dw is None else dw.to(ctx.weight_dtype),
                None, None, None, None, None, None)


def check_target_ids(target, vocab_size: int, ignore_index: int = -100):
    """Raise ValueError naming the first target id outside [0, vocab_size) that is not ``ignore_index``. One small
    reduction and a host sync: an id outside the vocabulary would otherwise be a device-side assert (PyTorch form)
    or a NaN loss (the kernel), neither naming the cause."""
    outside = (target >= vocab_size) | ((target < 0) & (target != ignore_index))
    if bool(outside.any()):
        raise ValueError(f"target id {int(target[outside][0])} is outside the vocabulary [0, {vocab_size}) and "
                         f"is not ignore_index={ignore_index}")


def linear_cross_entropy_chunked(hidden, weight, target, ignore_index: int = -100, reduction: str = "sum",
                                 chunk_size: int = DEFAULT_CHUNK):
    """Cross entropy of the logits ``hidden @ weight.T`` without materialising them. hidden [..., d], weight
    [V, d], target [...] (int); targets equal to ``ignore_index`` count 0 and get no gradient. ``reduction``:
    "sum", "mean" (over the targets not ignored) or "none" (per token, target's shape, 0 at ignored ones).
    Under autocast the matmuls run in its dtype, as the LM head's would; the softmax is fp32 (float64 for
    float64 inputs). The loss is fp32 (float64)."""
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    d = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden states of width {d}")
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match target {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class ids, got {target.dtype}")
    # a host sync cannot run while a CUDA graph is captured: a captured training step checks its targets eagerly
    # before each replay instead (tnllm_plugin.cuda_graph_step, its ``check``; check_target_ids is for that)
    if not (target.is_cuda and torch.cuda.is_current_stream_capturing()):
        check_target_ids(target, weight.shape[0], ignore_index)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out = LinearCrossEntropyFunction.apply(hidden.reshape(-1, d), weight, target.reshape(-1), int(ignore_index),
                                           "none" if reduction == "none" else "sum", int(chunk_size),
                                           _compute_dtype(hidden, weight), want_grad)
    if reduction == "none":
        return out.reshape(target.shape)
    if reduction == "mean":
        return out / (target != ignore_index).sum()
    return out
