"""tnllm_plugin.cuda_graph_step: a whole training step captured in a CUDA graph. On the CPU, the input errors that
come before any CUDA work; on a GPU (skipped without one), that the graphed steps train a TransNormerLLM exactly as
the eager steps do (the same losses and weights, bit for bit), that a changed input shape is refused after the
capture, and that ``check`` rejects bad tokens before any replay."""
import pytest
import torch

from tnllm_kernels.fused_cross_entropy import check_target_ids
from tnllm_plugin.cuda_graph_step import CUDAGraphStep
from tnllm_plugin.model import TransNormerConfig, TransNormerLLM

VOCAB = 512


def never_called(*inputs):
    raise AssertionError("step_fn ran on input that should have been refused")


def test_inputs_must_be_cuda_tensors():
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors: input 0 is on cpu"):
        CUDAGraphStep(never_called)(torch.zeros(2, dtype=torch.long), torch.zeros(2))


def test_inputs_must_be_tensors():
    with pytest.raises(TypeError, match="input 0 is a list; CUDAGraphStep takes tensors only"):
        CUDAGraphStep(never_called)([1, 2])


def test_no_inputs_is_refused():
    with pytest.raises(ValueError, match="at least one input tensor"):
        CUDAGraphStep(never_called)()


def test_warmup_must_be_at_least_one():
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        CUDAGraphStep(never_called, warmup=0)


# ---------------------------------------------------------------------------------------------------------------
# On a GPU

def tiny_bf16_model():
    """A two-layer TransNormerLLM in bf16 (head size 32: the Triton lightning attention kernel), seeded."""
    torch.manual_seed(0)
    cfg = TransNormerConfig(vocab_size=VOCAB, d_model=128, n_layers=2, n_heads=4, glu_dim=256)
    return TransNormerLLM(cfg).cuda().to(torch.bfloat16)


def training_step(model, opt):
    """One whole step as benchmarks/train_throughput.py's train_step takes it: bf16 autocast, the chunked LM head +
    loss, backward, the optimizer step, gradients to None."""
    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden, _ = model(x, return_hidden=True)
            loss = model.chunked_lm_loss(hidden, y, reduction="mean", chunk_size=96)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def capturable_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)


def batches(n, batch=4, seq=128, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq + 1), generator=g).cuda()
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def checked(model):
    """The check a graphed step of ``model`` takes: the model's token check on x, the loss's target check on y."""
    def check(x, y):
        model.check_tokens(x)
        check_target_ids(y, model.cfg.vocab_size)
    return check


@pytest.mark.gpu
def test_graphed_steps_train_bit_for_bit_as_eager_steps():
    """8 steps from the same weights on the same batches, eagerly and through CUDAGraphStep (3 eager, the capture's
    replay, 4 replays): the same losses and the same final weights, bit for bit."""
    data = batches(8)
    eager_model, graph_model = tiny_bf16_model(), tiny_bf16_model()
    assert all(torch.equal(p, q) for p, q in zip(graph_model.parameters(), eager_model.parameters()))
    start = [p.detach().clone() for p in graph_model.parameters()]
    eager_step = training_step(eager_model, capturable_adamw(eager_model))
    eager_losses = [eager_step(x, y).detach().clone() for x, y in data]     # autotunes the kernels first

    graph_step = CUDAGraphStep(training_step(graph_model, capturable_adamw(graph_model)), warmup=3,
                               check=checked(graph_model))
    graph_losses = [graph_step(x, y) for x, y in data]
    torch.cuda.synchronize()

    assert graph_step.graph is not None and graph_step.calls == 8
    for i, (a, b) in enumerate(zip(graph_losses, eager_losses)):
        assert torch.equal(a, b), f"step {i}: loss {a.item()} through the graph, {b.item()} eager"
    for (name, p), q in zip(graph_model.named_parameters(), eager_model.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(graph_model.lm_head.weight, start[-1])     # the replays did train


def linear_step():
    """A small linear regression's whole step (capturable fused AdamW): CUDAGraphStep's bookkeeping, cheaply."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True, capturable=True)

    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return model, step


@pytest.mark.gpu
def test_changed_input_shape_after_capture_is_refused():
    _, step = linear_step()
    x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")
    graph_step = CUDAGraphStep(step, warmup=1)
    graph_step(x, y)
    graph_step(x, y)                # the capture
    assert graph_step.graph is not None
    with pytest.raises(ValueError, match=r"input 0 changed from shape \(8, 16\) torch.float32 on cuda:0 to shape "
                                         r"\(5, 16\) torch.float32 on cuda:0"):
        graph_step(x[:5], y[:5])    # a last partial batch
    with pytest.raises(ValueError, match=r"input 1 changed from shape \(8, 4\) torch.float32 .* torch.float16"):
        graph_step(x, y.half())
    assert graph_step.calls == 2


@pytest.mark.gpu
def test_check_runs_on_every_call():
    _, step = linear_step()
    seen = []
    graph_step = CUDAGraphStep(step, warmup=2, check=lambda x, y: seen.append(x.shape))
    x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")
    for _ in range(5):              # 2 eager, the capture, 2 replays
        graph_step(x, y)
    assert len(seen) == 5 and graph_step.calls == 5


@pytest.mark.gpu
def test_check_rejects_bad_tokens_before_any_step():
    """An out-of-vocabulary token (or target) fails with the model's (the loss's) message: at the first call
    before step_fn runs, and after the capture before the replay (the weights do not move)."""
    model = tiny_bf16_model()
    graph_step = CUDAGraphStep(training_step(model, capturable_adamw(model)), warmup=1, check=checked(model))
    (x, y), = batches(1)
    bad_x, bad_y = x.clone(), y.clone()
    bad_x[1, 7] = VOCAB
    bad_y[2, 3] = VOCAB + 5
    with pytest.raises(ValueError, match=rf"token id {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"):
        graph_step(bad_x, y)
    assert graph_step.calls == 0
    graph_step(x, y)
    graph_step(x, y)                # the capture
    assert graph_step.graph is not None
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"token id {VOCAB} is outside the vocabulary"):
        graph_step(bad_x, y)
    with pytest.raises(ValueError, match=rf"target id {VOCAB + 5} is outside the vocabulary \[0, {VOCAB}\)"):
        graph_step(x, bad_y)
    torch.cuda.synchronize()
    assert graph_step.calls == 2
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    graph_step(x, y)                # a good batch still trains
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.gpu
def test_graph_steps_leave_no_memory_behind():
    """Every CUDAGraphStep warms up on one stream per device and captures on torch's own: with a new stream each,
    cuBLAS kept more workspace for every step built (the linear layer's products run in the warm-up; 65 MiB a step
    here on an H200), for as long as the process lived."""
    import gc
    x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")
    left = []
    for _ in range(4):
        model, step = linear_step()
        graph_step = CUDAGraphStep(step, warmup=1)
        graph_step(x, y)
        graph_step(x, y)            # the capture
        assert graph_step.graph is not None
        del model, step, graph_step
        gc.collect()
        torch.cuda.synchronize()
        left.append(torch.cuda.memory_allocated())
    assert left[1:] == left[:1] * 3, [f"{b / 2**20:.1f} MiB" for b in left]
