"""The recurrent form (the paper's Algorithm 2, "robust inference"): constant time and memory per token.

    S_t = lambda S_{t-1} + k_t v_t^T,   o_t = q_t S_t      (S kept in fp32)
"""
import torch


def lightning_attention_step(q, k, v, slope, state):
    """One token. q, k [B, H, Dk]; v [B, H, Dv]; state [B, H, Dk, Dv] fp32 (None means zeros).
    Returns (o [B, H, Dv] in v's dtype, new_state fp32)."""
    b, h, dk = q.shape
    if state is None:
        state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float32, device=q.device)
    acc = torch.promote_types(state.dtype, q.dtype)
    lam = torch.exp(-slope.to(acc))[None, :, None, None]
    state = lam * state.to(acc) + k.to(acc)[..., :, None] * v.to(acc)[..., None, :]
    o = torch.einsum("bhd,bhde->bhe", q.to(acc), state)
    return o.to(v.dtype), state


def lightning_attention_recurrent(q, k, v, slope, initial_state=None):
    """The whole sequence token by token; same contract as lightning_attention_naive."""
    state = initial_state
    outs = []
    for t in range(q.shape[1]):
        o, state = lightning_attention_step(q[:, t], k[:, t], v[:, t], slope, state)
        outs.append(o)
    return torch.stack(outs, dim=1), state
