"""Causal decayed linear attention, the paper's baseline: the quadratic left product.

    o_s = sum_{t <= s} lambda^(s - t) (q_s . k_t) v_t + lambda^(s + 1) q_s S_0

Layout everywhere in this package: q, k [B, N, H, Dk]; v [B, N, H, Dv]; state [B, H, Dk, Dv] (fp32);
``slope`` [H] is the per-head decay rate, lambda = exp(-slope), slope >= 0 (slope 0 means no decay).
"""
import torch


def decay_mask(slope: torch.Tensor, n: int) -> torch.Tensor:
    """M[h, s, t] = lambda_h^(s - t) for s >= t, else 0, as exp(-slope (s - t)) so large gaps underflow to 0."""
    idx = torch.arange(n, device=slope.device, dtype=slope.dtype)
    gap = idx[:, None] - idx[None, :]
    expo = -slope[:, None, None] * gap.clamp(min=0)
    return torch.where(gap >= 0, torch.exp(expo), torch.zeros((), dtype=slope.dtype, device=slope.device))


def lightning_attention_naive(q, k, v, slope, initial_state=None):
    """Left product ((Q K^T) * M) V, O(n^2). Returns (o, final_state); math in the inputs' dtype
    (call it with float64 tensors for a reference)."""
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    slope = slope.to(q.dtype)
    mask = decay_mask(slope, n)                                   # [H, N, N]
    scores = torch.einsum("bshd,bthd->bhst", q, k) * mask
    o = torch.einsum("bhst,bthe->bshe", scores, v)
    # the final state is what a recurrence would hold after the last token
    to_end = torch.exp(-slope[None, :] * (n - 1 - torch.arange(n, device=q.device, dtype=q.dtype))[:, None])  # [N, H]
    final = torch.einsum("bthd,bthe,th->bhde", k, v, to_end)
    if initial_state is not None:
        s0 = initial_state.to(q.dtype)
        pos = torch.arange(1, n + 1, device=q.device, dtype=q.dtype)
        q_decay = torch.exp(-slope[None, :] * pos[:, None])      # [N, H]: lambda^(s+1)
        o = o + torch.einsum("bshd,bhde,sh->bshe", q, s0, q_decay)
        final = final + s0 * torch.exp(-slope * n)[None, :, None, None]
    return o, final
