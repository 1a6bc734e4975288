"""The three PyTorch forms of causal decayed linear attention agree in float64: naive left product,
block form (any block size, initial/final state) and the token-by-token recurrence; forward and gradients."""
import pytest
import torch

from tnllm_kernels.lightning_attention import (lightning_attention_chunk, lightning_attention_naive,
                                               lightning_attention_recurrent, lightning_attention_step)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def inputs(b=2, n=37, h=3, dk=10, dv=6, seed=0, with_state=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, n, h, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
    s0 = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64) if with_state else None
    return q, k, v, s0


# several decays per head, including slope 0 (lambda = 1) and strong decay
SLOPES = [torch.tensor([0.0, 0.05, 1.3], dtype=torch.float64),
          torch.tensor([0.7, 0.0, 0.002], dtype=torch.float64)]


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("n,block", [(1, 16), (37, 16), (64, 16), (50, 64), (33, 7)])
def test_block_and_recurrent_equal_naive(slope, n, block):
    q, k, v, s0 = inputs(n=n)
    o_ref, f_ref = lightning_attention_naive(q, k, v, slope, s0)
    o_blk, f_blk = lightning_attention_chunk(q, k, v, slope, s0, block_size=block)
    o_rec, f_rec = lightning_attention_recurrent(q, k, v, slope, s0)
    assert rel(o_blk, o_ref) < 1e-12 and rel(f_blk, f_ref) < 1e-12
    assert rel(o_rec, o_ref) < 1e-12 and rel(f_rec, f_ref) < 1e-12


def test_naive_matches_the_definition():
    """o_s = sum_{t<=s} lambda^(s-t) (q_s . k_t) v_t, written as loops: guards the shared mask helper too."""
    q, k, v, _ = inputs(b=1, n=9, h=2, dk=3, dv=2, with_state=False)
    slope = torch.tensor([0.0, 0.4], dtype=torch.float64)
    o, _ = lightning_attention_naive(q, k, v, slope)
    lam = torch.exp(-slope)
    for s in range(9):
        for h in range(2):
            want = sum(lam[h] ** (s - t) * (q[0, s, h] @ k[0, t, h]) * v[0, t, h] for t in range(s + 1))
            assert torch.allclose(o[0, s, h], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [8, 64])
def test_gradients_agree(block):
    slope = SLOPES[0]
    base = inputs(n=29)
    grads = {}
    for name, fn in [("naive", lambda *a: lightning_attention_naive(*a)),
                     ("block", lambda *a: lightning_attention_chunk(*a, block_size=block)),
                     ("recurrent", lambda *a: lightning_attention_recurrent(*a))]:
        leaves = [t.clone().requires_grad_(True) for t in base]
        o, final = fn(leaves[0], leaves[1], leaves[2], slope, leaves[3])
        g = torch.Generator().manual_seed(1)
        (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum().backward(retain_graph=True)
        (final * torch.randn(final.shape, generator=g, dtype=o.dtype)).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for name in ("block", "recurrent"):
        for g_ref, g_other in zip(grads["naive"], grads[name]):
            assert rel(g_other, g_ref) < 1e-12


def test_prefill_state_continues_decoding():
    """Block-form prefill hands its final state to the single-step recurrence."""
    q, k, v, _ = inputs(n=40, with_state=False)
    slope = SLOPES[1]
    o_full, _ = lightning_attention_naive(q, k, v, slope)
    o_pre, state = lightning_attention_chunk(q[:, :25], k[:, :25], v[:, :25], slope, block_size=16)
    outs = [o_pre]
    for t in range(25, 40):
        o_t, state = lightning_attention_step(q[:, t], k[:, t], v[:, t], slope, state)
        outs.append(o_t[:, None])
    assert rel(torch.cat(outs, 1), o_full) < 1e-12


def test_block_form_keeps_fp32_state_for_low_precision_inputs():
    q, k, v, _ = inputs(n=20, with_state=False)
    o, state = lightning_attention_chunk(q.bfloat16(), k.bfloat16(), v.bfloat16(), SLOPES[0].float(), block_size=8)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    o_ref, _ = lightning_attention_naive(q, k, v, SLOPES[0])
    assert rel(o.double(), o_ref) < 2e-2
