"""Linear layers whose input is recomputed in backward (tnllm_plugin/recompute.py, used by the model's norms, the
GLA output gate and SGLU's product): the same outputs and gradients as the plain composition, bit for bit on the
CPU for the outputs and to fp32 rounding for the gradients (fp32 and under bf16 autocast), and fewer bytes kept
for backward."""
import gc
import weakref

import pytest
import torch
from torch import nn

from tnllm_plugin.model import TransNormerConfig, TransNormerLLM
from tnllm_plugin.parallel import apply_activation_checkpointing
from tnllm_plugin.recompute import Product, keep_linear_inputs, linears_after


def tiny(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, glu_dim=48, block_size=8)
    torch.manual_seed(0)
    return TransNormerLLM(TransNormerConfig(**{**base, **kw}))


def step(model, tokens, autocast):
    """Logits and every parameter's gradient of a weighted sum of the logits."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, _ = model(tokens)
    w = torch.linspace(-1, 1, logits.shape[-1])
    (logits.float() * w).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp32_noise(kw, tokens):
    """Per parameter, how far the plain composition's fp32 gradients are from its float64 ones: the rounding of the
    computation itself, within which another order of the same additions may move them."""
    fp32 = step(keep_linear_inputs(tiny(**kw)), tokens, False)[1]
    fp64 = step(keep_linear_inputs(tiny(**kw).double()), tokens, False)[1]
    return {name: rel(fp32[name], fp64[name]) for name in fp32}


def assert_same(a, b, noise):
    """Equal outputs; gradients equal but for the order in which autograd adds up a residual's gradients (the
    norm's own and the residual path's, now summed inside the recomputing layer): within 3x the fp32 rounding of
    the computation (observed: at most 1.5x)."""
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.equal(out_a, out_b)
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        assert rel(grads_a[name], grads_b[name]) <= 3 * max(noise[name], 1e-7), name


@pytest.mark.parametrize("kw", [dict(), dict(lrpe_layers=(0, 1)), dict(bias=True), dict(qk_act="1+elu"),
                                dict(norm="rms"), dict(norm="layer", bias=True), dict(hidden_dim=48)])
@pytest.mark.parametrize("autocast", [False, True])
def test_model_outputs_and_gradients_equal_the_plain_composition(kw, autocast):
    model = tiny(**kw)
    tokens = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(1))
    plain = step(keep_linear_inputs(model), tokens, autocast)
    assert_same(step(keep_linear_inputs(model, False), tokens, autocast), plain, fp32_noise(kw, tokens))


def test_with_activation_checkpointing_and_frozen_weights():
    model = tiny()
    tokens = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(2))
    noise = fp32_noise({}, tokens)
    plain = step(keep_linear_inputs(model), tokens, False)
    assert_same(step(apply_activation_checkpointing(keep_linear_inputs(model, False)), tokens, False), plain, noise)
    for name, p in model.named_parameters():     # only the embedding learns: the inputs' gradients alone
        p.requires_grad_(name == "embed_tokens.weight")
    plain = step(keep_linear_inputs(model), tokens, True)
    assert_same(step(keep_linear_inputs(model, False), tokens, True), plain, noise)


@pytest.mark.parametrize("autocast", [False, True])
def test_several_linears_with_biases_and_an_unused_output(autocast):
    """Direct use: three layers after one prefix, biases, an output no loss uses (no gradient for its layer), and
    a prefix whose result depends on autocast (a matmul), which the backward must recompute under the same state.
    The prefix's output is not kept after the forward."""
    g = torch.Generator().manual_seed(3)
    linears = [nn.Linear(6, 5), nn.Linear(6, 7), nn.Linear(6, 4, bias=False)]
    x, u = torch.randn(2, 3, 6, generator=g, requires_grad=True), torch.randn(2, 3, 6, generator=g, requires_grad=True)
    mix = torch.randn(6, 6, generator=g)
    made = []

    def prefix(a, b):
        y = torch.tanh(a) * b + a @ mix
        made.append(weakref.ref(y))
        return y

    def run(recompute):
        leaves = [x, u, *(p for m in linears for p in m.parameters())]
        for t in leaves:
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = linears_after(prefix, [x, u], linears, recompute)
        gc.collect()
        alive = made[0]() is not None
        made.clear()
        (outs[0].float().sum() + (outs[2].float() * 3).sum()).backward()    # outs[1] unused
        return outs, [t.grad for t in leaves], alive
    want_outs, want_grads, _ = run(recompute=False)
    outs, grads, alive = run(recompute=True)
    assert not alive
    assert all(torch.equal(a, b) for a, b in zip(outs, want_outs))
    assert [g is None for g in grads] == [g is None for g in want_grads]
    assert all(a is None or torch.equal(a, b) for a, b in zip(grads, want_grads))
    assert linears[1].weight.grad is None and linears[0].bias.grad is not None


@pytest.mark.parametrize("autocast", [False, True])
def test_a_prefix_with_a_vjp_takes_no_autograd_pass(autocast, monkeypatch):
    """SGLU's product through its vjp: no nested torch.autograd.grad in the backward (a host cost of the training
    step), the plain composition's outputs and gradients bit for bit; only the inputs that need a gradient get one."""
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(6, 4)
    a, b = torch.randn(2, 3, 6, generator=g, requires_grad=True), torch.randn(2, 3, 6, generator=g)

    def run(recompute):
        for t in (a, *lin.parameters()):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, = linears_after(Product(), [a, b], [lin], recompute)
        out.float().square().sum().backward()
        return out, [t.grad for t in (a, *lin.parameters())]
    want = run(False)
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *x, **k: pytest.fail("a nested autograd pass ran"))
    got = run(True)
    monkeypatch.setattr(torch.autograd, "grad", real_grad)
    assert torch.equal(got[0], want[0]) and all(torch.equal(x, y) for x, y in zip(got[1], want[1]))
    assert b.grad is None


def saved_storages(model, tokens, autocast):
    """(shape, bytes) of each storage kept for backward by a forward of the model."""
    found = {}

    def pack(t):
        found.setdefault(t.untyped_storage().data_ptr(), (tuple(t.shape), t.untyped_storage().nbytes()))
        return t
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(tokens)
    return [v for k, v in found.items() if k not in params]


@pytest.mark.parametrize("autocast", [False, True])
def test_fewer_bytes_are_kept(autocast):
    """Per layer, no longer kept: the token norm's output (what QKVU reads), W_o's input (the gated norm), the
    channel norm's output (what W1 and W2 read) and W3's input (the product), each of its own width; under
    autocast also the bf16 copies of the weights of the layers that recompute their input."""
    model = tiny(glu_dim=56)
    b, n, cfg = 2, 17, model.cfg
    tokens = torch.randint(0, 97, (b, n), generator=torch.Generator().manual_seed(4))
    plain = saved_storages(keep_linear_inputs(model), tokens, autocast)
    ours = saved_storages(keep_linear_inputs(model, False), tokens, autocast)
    products = lambda saved: sum(1 for shape, _ in saved if shape[-1] == cfg.glu_dim and  # noqa: E731
                                 shape[0] * (shape[1] if len(shape) == 3 else 1) == b * n)
    assert products(plain) == 3 * cfg.n_layers and products(ours) == 2 * cfg.n_layers   # W3's input is gone
    width = 2 if autocast else 4
    gone = cfg.n_layers * b * n * width * (cfg.d_model + cfg.hidden_dim + cfg.d_model + cfg.glu_dim)
    assert sum(nbytes for _, nbytes in plain) - sum(nbytes for _, nbytes in ours) >= gone


def test_some_inputs_kept_others_recomputed():
    """keep_linear_inputs with names: those linear inputs are kept, the rest recomputed. Keeping all but SGLU's
    product keeps what the plain composition keeps less W3's input (one [tokens, glu_dim] activation a layer), with
    the plain composition's outputs; a name it does not know is refused, naming the known ones."""
    model = tiny(glu_dim=56)
    b, n, cfg = 2, 17, model.cfg
    tokens = torch.randint(0, 97, (b, n), generator=torch.Generator().manual_seed(4))
    plain = saved_storages(keep_linear_inputs(model), tokens, False)
    want = model(tokens)[0]
    keep_linear_inputs(model, ["token_norm", "out_gate", "channel_norm"])
    assert {m.recompute_linear_inputs for m in model.modules() if hasattr(m, "recompute_linear_inputs")} == \
        {frozenset(), frozenset({"sglu_product"})}
    some = saved_storages(model, tokens, False)
    assert torch.equal(model(tokens)[0], want)
    assert sum(nb for _, nb in plain) - sum(nb for _, nb in some) == cfg.n_layers * b * n * 4 * cfg.glu_dim
    with pytest.raises(ValueError, match="unknown \\['sglu'\\].*sglu_product"):
        keep_linear_inputs(model, ["sglu"])
