"""The block form, linear in sequence length (Lightning Attention-2 style), in PyTorch.

Inside a block of B tokens: the masked left product with the decay mask. Between blocks: the e x e
state S, carried in fp32. For query i of a block (0-based) the carried state is decayed by lambda^(i+1);
key j contributes to the next state with lambda^(B-1-j); the state itself decays by lambda^B per block.
This is the CPU path of the model and the reference the Triton kernel is checked against.
"""
import torch

from .naive import decay_mask


def lightning_attention_chunk(q, k, v, slope, initial_state=None, block_size: int = 64):
    """Same contract as lightning_attention_naive: returns (o in v's dtype, final_state fp32 [B, H, Dk, Dv]).
    Any sequence length; the last block may be short."""
    b, n, h, dk = q.shape
    dv = v.shape[-1]
    acc = torch.promote_types(torch.float32, q.dtype)        # fp32 accumulation, fp64 stays fp64
    s = slope.to(acc)
    state = (torch.zeros(b, h, dk, dv, dtype=acc, device=q.device) if initial_state is None
             else initial_state.to(acc))
    mask = decay_mask(s, min(block_size, n))                  # [H, B, B]
    outs = []
    for start in range(0, n, block_size):
        m = min(block_size, n - start)
        qi, ki, vi = (t[:, start:start + m].to(acc) for t in (q, k, v))
        pos = torch.arange(m, device=q.device, dtype=acc)
        q_decay = torch.exp(-s[None, :] * (pos[:, None] + 1))          # [m, H] lambda^(i+1)
        k_decay = torch.exp(-s[None, :] * (m - 1 - pos[:, None]))      # [m, H] lambda^(m-1-j)
        intra = torch.einsum("bshd,bthd->bhst", qi, ki) * mask[:, :m, :m]
        o = torch.einsum("bhst,bthe->bshe", intra, vi)
        o = o + torch.einsum("bshd,bhde->bshe", qi * q_decay[None, :, :, None], state)
        state = (state * torch.exp(-s * m)[None, :, None, None]
                 + torch.einsum("bthd,bthe->bhde", ki * k_decay[None, :, :, None], vi))
        outs.append(o)
    o = torch.cat(outs, dim=1) if outs else v.new_zeros(b, 0, h, dv)
    return o.to(v.dtype), state
