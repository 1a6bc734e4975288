"""The chunked LM head + cross entropy against float64 F.cross_entropy(h @ W.T): loss and both gradients, every
reduction, chunk sizes that do not divide the tokens, padding targets, batch shapes, bf16 autocast; and the memory
property itself (no tensor the size of the whole logits is made or saved).

Then the Triton kernel that computes each chunk's losses and gradient on CUDA (triton_softmax_grad.py): against a
float64 softmax and against the PyTorch form it replaces, alone and inside linear_cross_entropy_chunked. Without
CUDA it runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernel module is imported) at small
shapes; with CUDA the same tests run on the GPU, plus the training shape (4096 x 64000 bf16, marked ``gpu``)."""
import importlib.util

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from triton_cpu import CUDA, DEV, compile_for_sm90, import_kernel_module

HAS_TRITON = importlib.util.find_spec("triton") is not None
softmax_grad = import_kernel_module("tnllm_kernels.fused_cross_entropy.triton_softmax_grad") if HAS_TRITON else None
from tnllm_kernels.fused_cross_entropy import chunked  # noqa: E402
from tnllm_kernels.fused_cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_reference  # noqa: E402

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
    gh, gw = torch.autograd.grad((loss * r.to(loss.device, loss.dtype)).sum(), [hidden, weight])
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


# ------------------------------------------------------------------------------------------------ the Triton kernel
# (an uninterpreted Triton on a CPU machine already fails this module's import_kernel_module above)
needs_kernel = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
# one rounding step of the gradient's dtype relative to its value; below the floor, fp16's subnormals, and for bf16
# fp32's (the math is fp32: whether an exp there is flushed to 0 differs between libraries, and means nothing here)
STEP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
FLOOR = {torch.bfloat16: 2.0 ** -126, torch.float16: 2.0 ** -24}


def chunk_inputs(rows, vocab, dtype, seed, d=32, device=DEV):
    """h, W (in ``dtype``), targets and row scales of one chunk; logits h W^T of spread ~3, one row's ~25."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, d, generator=g)
    h[1] *= 8                   # large logits: only a max subtracted first keeps exp finite
    w = 0.5 * torch.randn(vocab, d, generator=g)
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[0], target[2], target[-1] = vocab - 1, PAD, 0    # the last (ragged) tile's last column, a pad, column 0
    scale = torch.rand(rows, generator=g) + 0.5
    return h.to(device, dtype), w.to(device, dtype), target.to(device), scale.to(device)


def softmax_float64(z, target, scale=None, ignore_index=PAD):
    """losses and (softmax - onehot) * scale of the logits z, in float64, 0 on ignored rows."""
    z = z.double()
    ignored = target == ignore_index
    safe = target.masked_fill(ignored, 0)
    loss = (torch.logsumexp(z, 1) - z.gather(1, safe[:, None])[:, 0]).masked_fill(ignored, 0)
    grad = torch.softmax(z, 1)
    grad[torch.arange(len(target), device=z.device), safe] -= 1
    grad[ignored] = 0
    return loss, grad if scale is None else grad * scale.double()[:, None]


def one_step_apart(got, torch_form, dtype, label):
    """Each element the PyTorch form's or one rounding step of ``dtype`` from it, and few of them differ."""
    diff = (got.double() - torch_form.double()).abs()
    bound = STEP[dtype] * torch_form.double().abs() + FLOOR[dtype]
    assert (diff <= bound).all(), f"{label}: {int((diff > bound).sum())} elements over one step off"
    flips = int((got != torch_form).sum())
    assert flips <= 2 + 0.01 * got.numel(), f"{label}: {flips} of {got.numel()} elements differ"


def gradient_within_rounding(got, torch_form, want, dtype, label=""):
    """The kernel's gradient against the PyTorch form's (same inputs) and the float64 one: fp32 to fp32 noise; in
    bf16/fp16 each element the PyTorch form's or one rounding step from it (the fp32 sums' order can flip a rounding,
    rarely), and no farther from float64 than the PyTorch form is."""
    assert got.dtype == torch_form.dtype == dtype and got.shape == want.shape, label
    err, torch_err = rel(got, want), rel(torch_form, want)
    if dtype == torch.float32:
        assert err < 1e-6 and rel(got, torch_form) < 1e-6, f"{label}: {err:.3g} from float64"
        return
    one_step_apart(got, torch_form, dtype, label)
    assert err <= 1.05 * torch_err + 1e-7, f"{label}: {err:.3g} from float64, the PyTorch form {torch_err:.3g}"


# (rows, vocab, BLOCK_V): blocks that do not divide the vocab (a ragged last tile), and one tile only
SHAPES = [(5, 300, 128), (9, 1000, 256), (7, 257, 64), (6, 500, 512)]
KERNEL_CASES = [(*shape, dtype, scaled) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16)
                for scaled in (False, True)] + [(9, 1000, 256, torch.float16, True)]


@needs_kernel
@pytest.mark.parametrize("rows,vocab,block,dtype,scaled", KERNEL_CASES)
def test_kernel_matches_float64_and_the_torch_form(rows, vocab, block, dtype, scaled):
    h, w, target, scale = chunk_inputs(rows, vocab, dtype, seed=rows * vocab)
    scale = scale if scaled else None
    z = h @ w.T
    loss64, grad64 = softmax_float64(z, target, scale)
    torch_loss, torch_grad = chunked._chunk_pass_torch(h, w, target, PAD, torch.float32, True, scale)

    logits = z.clone()
    loss = softmax_grad.softmax_cross_entropy_grad_(logits, target, PAD, False, scale, block_v=block)
    assert torch.equal(logits, z), "without want_grad the logits must stay as they are"
    loss_g = softmax_grad.softmax_cross_entropy_grad_(logits, target, PAD, True, scale, block_v=block)
    assert loss.dtype == torch.float32 and torch.equal(loss, loss_g)
    assert rel(loss, loss64) < 1e-6 and rel(loss, torch_loss) < 1e-6
    ignored = target == PAD
    assert (loss[ignored] == 0).all() and (logits[ignored] == 0).all()
    gradient_within_rounding(logits, torch_grad, grad64, dtype, f"{dtype} {rows}x{vocab}/{block}")


@needs_kernel
def test_kernel_odd_targets():
    """ignore_index -100 (every row counted), every row ignored, an out-of-range target (NaN: no host check), no
    rows."""
    h, w, target, _ = chunk_inputs(5, 300, torch.float32, seed=3)
    z = h @ w.T
    loss = softmax_grad.softmax_cross_entropy_grad_(z.clone(), target, -100, False, block_v=128)
    assert rel(loss, softmax_float64(z, target, ignore_index=-100)[0]) < 1e-6 and (loss > 0).all()
    logits = z.clone()
    loss = softmax_grad.softmax_cross_entropy_grad_(logits, torch.full_like(target, 7), 7, True, block_v=128)
    assert (loss == 0).all() and (logits == 0).all()
    bad = target.clone()
    bad[1], bad[3] = 300, -5
    loss = softmax_grad.softmax_cross_entropy_grad_(z.clone(), bad, PAD, False, block_v=128)
    assert loss[[1, 3]].isnan().all() and not loss[[0, 4]].isnan().any()
    empty = softmax_grad.softmax_cross_entropy_grad_(z[:0], target[:0], PAD, True)
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="contiguous"):
        softmax_grad.softmax_cross_entropy_grad_(z.t(), target, PAD, True)


def test_kernel_dispatch(monkeypatch):
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    assert not chunked._kernel_applies(h, w) and not chunked._kernel_applies(h.double(), w.double())
    monkeypatch.setattr(chunked, "interpret_on_cpu", True)
    assert chunked._kernel_applies(h, w) == HAS_TRITON and chunked._kernel_applies(h.bfloat16(), w.bfloat16())
    assert not chunked._kernel_applies(h.double(), w.double())      # float64 keeps the PyTorch form
    monkeypatch.setattr(chunked, "use_kernel", False)
    assert not chunked._kernel_applies(h, w)


@needs_kernel
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("autocast", [False, True])
def test_chunked_with_the_kernel_equals_the_torch_form(reduction, autocast, monkeypatch):
    """linear_cross_entropy_chunked with the kernel (interpreted on CPU) against its PyTorch form: loss and both
    gradients, forward and backward (the "none" reduction's backward recomputes the chunks with row scales)."""
    hidden, weight, target = (t.detach().to(DEV) for t in inputs((3, 13), d=32, vocab=300, dtype=torch.float32,
                                                                  pad_every=5))
    hidden.requires_grad_(), weight.requires_grad_()
    calls = []
    real = softmax_grad.softmax_cross_entropy_grad_
    monkeypatch.setattr(softmax_grad, "softmax_cross_entropy_grad_", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(softmax_grad, "BLOCK_V", 128)         # vocab 300: three tiles, the last one ragged
    monkeypatch.setattr(chunked, "interpret_on_cpu", not CUDA)

    def run(kernel):
        monkeypatch.setattr(chunked, "use_kernel", kernel)
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
            return loss_and_grads(linear_cross_entropy_chunked, hidden, weight, target, reduction, ignore_index=PAD,
                                  chunk_size=16)
    got = run(True)
    assert len(calls) == (6 if reduction == "none" else 3)    # 3 chunks; "none" recomputes them in backward
    torch_form = run(False)
    assert len(calls) == (6 if reduction == "none" else 3)
    want = reference(hidden, weight, target, reduction)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    assert rel(got[0], torch_form[0]) < 1e-6
    for a, t, b in zip(got, torch_form, want):
        b = b.reshape(a.shape)
        if autocast:    # the bf16 gradients of the logits differ by a rare rounding flip, then go through matmuls
            assert rel(a, t) < 1e-3 and rel(a, b) <= 1.1 * rel(t, b) + 1e-6, (rel(a, t), rel(a, b), rel(t, b))
        else:
            assert rel(a, t) < 2e-6 and rel(a, b) < 2e-6, (rel(a, t), rel(a, b))


@pytest.mark.gpu
@needs_kernel
def test_gpu_training_chunk_bf16():
    """The training step's chunk, 4096 rows x vocab 64000 in bf16, against the PyTorch form; and no fp32 copy of
    the chunk: the kernel path's peak memory is the bf16 logits'."""
    rows, vocab, d = 4096, 64000, 256
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, d, generator=g).to(DEV, torch.bfloat16)
    w = (torch.randn(vocab, d, generator=g) * 3 / d ** 0.5).to(DEV, torch.bfloat16)
    target = torch.randint(0, vocab, (rows,), generator=g).to(DEV)
    target[::17] = PAD
    scale = (torch.rand(rows, generator=g) + 0.5).to(DEV)
    assert chunked._kernel_applies(h, w)
    for row_scale in (None, scale):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss, grad = chunked._chunk_pass(h, w, target, PAD, torch.float32, True, row_scale)
        peak = torch.cuda.max_memory_allocated() - base
        assert peak < 1.01 * rows * vocab * 2, f"peak {peak / 2**20:.0f} MiB"
        torch_loss, torch_grad = chunked._chunk_pass_torch(h, w, target, PAD, torch.float32, True, row_scale)
        assert rel(loss, torch_loss) < 1e-6 and (loss[::17] == 0).all() and (grad[::17] == 0).all()
        loss_only, none = chunked._chunk_pass(h, w, target, PAD, torch.float32, False, row_scale)
        assert none is None and torch.equal(loss_only, loss)
        one_step_apart(grad, torch_grad, torch.bfloat16, "every row")
        sub = slice(0, 512)     # float64 on a slice of rows, of the very logits both forms saw
        want = softmax_float64((h @ w.T)[sub], target[sub], None if row_scale is None else row_scale[sub])
        assert rel(loss[sub], want[0]) < 1e-6
        gradient_within_rounding(grad[sub], torch_grad[sub], want[1], torch.bfloat16, "rows 0-511")


def test_kernel_compiles_for_sm90_without_a_gpu():
    """The GPU path (libdevice's exp and log, the plain bf16 cast) compiled for sm_90: what the interpreter cannot
    check, checked on a machine without a GPU too."""
    from tnllm_kernels.fused_cross_entropy.triton_softmax_grad import BLOCK_V
    cases = []
    for dt, grad, scale in (("bf16", True, True), ("fp32", False, False), ("fp16", True, False)):
        sig = dict(Z=f"*{dt}", TARGET="*i64", SCALE="*fp32", LOSS="*fp32", V="i32", stride_z="i32",
                   stride_scale="i32", ignore_index="i32",
                   **{n: "constexpr" for n in ("WANT_GRAD", "HAS_SCALE", "LIBDEVICE", "RNE_BY_HAND", "BLOCK_V")})
        consts = dict(WANT_GRAD=grad, HAS_SCALE=scale, LIBDEVICE=True, RNE_BY_HAND=False, BLOCK_V=BLOCK_V)
        cases.append((sig, consts, 4))
    compile_for_sm90("tnllm_kernels.fused_cross_entropy.triton_softmax_grad", "_softmax_ce_kernel", cases)


@pytest.mark.parametrize("bad", [53, 1000, -1])
def test_target_outside_the_vocabulary_is_named(bad):
    """A target id outside [0, vocab) that is not ignore_index fails before any work, naming the id."""
    h, w, target = inputs(vocab=53)[:3]
    target = target.clone()
    target[5] = bad
    with pytest.raises(ValueError, match=f"target id {bad} is outside the vocabulary \\[0, 53\\)"):
        linear_cross_entropy_chunked(h, w, target)
    target[5] = -100            # ignore_index: fine
    linear_cross_entropy_chunked(h, w, target)
