"""The chunked LM head + cross entropy against float64 F.cross_entropy(h @ W.T): loss and both gradients, every
reduction, chunk sizes that do not divide the tokens, padding targets, batch shapes, bf16 autocast; and the memory
property itself (no tensor the size of the whole logits is made or saved)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tnllm_kernels.fused_cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_reference

PAD = 1


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def inputs(shape=(37,), d=24, vocab=53, seed=0, dtype=torch.float64, pad_every=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (0.5 * torch.randn(vocab, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, shape, generator=g)
    if pad_every:
        flat = target.view(-1)
        flat[::pad_every] = PAD
        flat[-3:] = PAD          # a padded tail, as in right-padded batches
    return hidden, weight, target


def loss_and_grads(fn, hidden, weight, target, reduction, seed=1, **kw):
    """The loss, then the gradients of sum(loss * r) for a random r (per token for "none"): a backward that
    ignored or misplaced its incoming gradient would not pass."""
    loss = fn(hidden, weight, target, reduction=reduction, **kw)
    r = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    gh, gw = torch.autograd.grad((loss * r.to(loss.dtype)).sum(), [hidden, weight])
    return loss.detach(), gh, gw


def reference(hidden, weight, target, reduction, ignore_index=PAD):
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    return loss_and_grads(linear_cross_entropy_reference, h64, w64, target, reduction, ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("shape,chunk", [((37,), 8), ((37,), 1), ((37,), 37), ((37,), 4096), ((3, 13), 5),
                                         ((2, 16), 16)])
@pytest.mark.parametrize("pad_every", [0, 4])
def test_float64_equals_reference(reduction, shape, chunk, pad_every):
    hidden, weight, target = inputs(shape, pad_every=pad_every)
    got = loss_and_grads(linear_cross_entropy_chunked, hidden, weight, target, reduction, ignore_index=PAD,
                         chunk_size=chunk)
    want = reference(hidden, weight, target, reduction)
    assert got[0].shape == want[0].reshape(got[0].shape).shape == (target.shape if reduction == "none" else ())
    for a, b in zip(got, want):
        assert rel(a, b.reshape(a.shape)) < 1e-12


def test_padding_is_ignored_in_loss_and_gradient():
    hidden, weight, target = inputs((4, 9), pad_every=5)
    loss = linear_cross_entropy_chunked(hidden, weight, target, ignore_index=PAD, reduction="none", chunk_size=7)
    assert (loss[target == PAD] == 0).all() and (loss[target != PAD] > 0).all()
    gh, = torch.autograd.grad(loss.sum(), [hidden])
    assert (gh[target == PAD] == 0).all() and (gh[target != PAD].abs().sum(-1) > 0).all()
    # a row whose target is the pad id but counted (ignore_index elsewhere) would change the sum
    other = linear_cross_entropy_chunked(hidden, weight, target, ignore_index=-100, reduction="sum")
    assert (other - loss.sum()).abs() > 1e-3


def test_float32_within_rounding():
    hidden, weight, target = inputs((3, 29), dtype=torch.float32, pad_every=6)
    got = loss_and_grads(linear_cross_entropy_chunked, hidden, weight, target, "sum", ignore_index=PAD,
                         chunk_size=16)
    want = reference(hidden, weight, target, "sum")
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.float32
    for a, b in zip(got, want):
        assert rel(a, b) < 2e-6


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_bf16_autocast(reduction):
    """Under autocast the head's matmuls run in bf16 as the unfused LM head's would, and the result is as close to
    the float64 reference as the unfused step under the same autocast is (its bf16 logits and gradients)."""
    hidden, weight, target = inputs((4, 33), d=64, vocab=300, dtype=torch.float32, pad_every=7)
    want = reference(hidden, weight, target, reduction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(linear_cross_entropy_chunked, hidden, weight, target, reduction, ignore_index=PAD,
                             chunk_size=40)
        unfused = loss_and_grads(linear_cross_entropy_reference, hidden, weight, target, reduction,
                                 ignore_index=PAD)
    fp32 = loss_and_grads(linear_cross_entropy_chunked, hidden, weight, target, reduction, ignore_index=PAD,
                          chunk_size=40)
    assert got[0].dtype == torch.float32 and got[1].dtype == hidden.dtype and got[2].dtype == weight.dtype
    for a, u, f, b in zip(got, unfused, fp32, want):
        b, u = b.reshape(a.shape), u.reshape(a.shape)
        err, unfused_err, fp32_err = rel(a, b), rel(u, b), rel(f, b)
        assert fp32_err < 1e-5                      # without autocast: fp32 rounding
        assert 10 * fp32_err < unfused_err < 1e-2   # bf16 rounding, far above it: the comparison can see it
        assert err < 1.5 * unfused_err              # no worse than the unfused step under the same autocast
        assert rel(a, f) > 10 * fp32_err            # autocast was honoured (an fp32 matmul would give f)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_at_most_one_chunk_of_logits(reduction):
    n, d, vocab, chunk = 96, 8, 500, 16
    hidden, weight, target = inputs((n,), d=d, vocab=vocab, dtype=torch.float32)
    saved = []
    with LargestTensor() as largest, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = linear_cross_entropy_chunked(hidden, weight, target, reduction=reduction, chunk_size=chunk)
        forward_largest = largest.largest
        loss.sum().backward()
    assert forward_largest == largest.largest == chunk * vocab     # the chunk's logits, never n * vocab
    with LargestTensor() as unfused:
        linear_cross_entropy_reference(hidden, weight, target).backward()
    assert unfused.largest == n * vocab                             # guards the probe
    # saved for backward: the gradients w.r.t. hidden and W (sum), or hidden, W and the targets (none)
    assert sum(saved) == n * d + vocab * d + (n if reduction == "none" else 0)


def test_no_grad_saves_nothing_and_matches():
    hidden, weight, target = inputs((2, 10), pad_every=3)
    with torch.no_grad():
        loss = linear_cross_entropy_chunked(hidden, weight, target, ignore_index=PAD, chunk_size=3)
    assert loss.grad_fn is None
    assert rel(loss, linear_cross_entropy_reference(hidden, weight, target, ignore_index=PAD)) < 1e-12


def test_bad_arguments():
    hidden, weight, target = inputs((5,))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy_chunked(hidden, weight, target, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy_chunked(hidden, weight, target, chunk_size=0)
    with pytest.raises(ValueError, match="does not match target"):
        linear_cross_entropy_chunked(hidden, weight, target[:4])
    with pytest.raises(ValueError, match="width"):
        linear_cross_entropy_chunked(hidden, weight[:, :5], target)
    with pytest.raises(TypeError, match="integer"):
        linear_cross_entropy_chunked(hidden, weight, target.double())
