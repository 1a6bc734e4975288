"""The plain-PyTorch model: parity with the released implementation, decoding, LRPE, decay schedules,
ablation options and the errors bad input must raise."""
import json
import math

import pytest
import torch

from tnllm_plugin.checkpoint import config_from_released, load_checked, state_dict_from_released
from tnllm_plugin.model import LRPE, DecodeState, TransNormerConfig, TransNormerLLM, alibi_slopes, decay_slopes

from shared_data import RELEASED_TINY

FIXTURE = RELEASED_TINY


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def released_tiny():
    cfg = config_from_released(json.loads((FIXTURE / "config.json").read_text()))
    model = TransNormerLLM(cfg).eval()
    load_checked(model, state_dict_from_released(torch.load(FIXTURE / "pytorch_model.bin")))
    return model, torch.load(FIXTURE / "expected.pt")


def decode_stepwise(model, tokens, prefill_len):
    logits, state = model(tokens[:, :prefill_len], use_cache=True)
    outs = [logits]
    for i in range(prefill_len, tokens.shape[1]):
        step, state = model(tokens[:, i:i + 1], state)
        outs.append(step)
    return torch.cat(outs, dim=1), state


@torch.no_grad()
def test_released_fixture_full_forward():
    model, expected = released_tiny()
    logits, _ = model(expected["tokens"])
    assert rel(logits, expected["logits"]) < 1e-5


@torch.no_grad()
def test_released_fixture_prefill_then_decode():
    model, expected = released_tiny()
    logits, state = decode_stepwise(model, expected["tokens"], expected["prefill_len"])
    assert rel(logits, expected["logits_prefill_then_decode"]) < 1e-5
    assert state.offset == expected["tokens"].shape[1]
    assert all(s.dtype == torch.float32 for s in state.kv)


def tiny(**kw):
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, glu_dim=48, block_size=8)
    torch.manual_seed(0)
    return TransNormerLLM(TransNormerConfig(**{**base, **kw})).double().eval()


@pytest.mark.parametrize("kw", [dict(), dict(decay="paper"), dict(lrpe_layers=(0, 2)), dict(qk_act="1+elu"),
                                dict(qk_act="none", norm="rms"), dict(norm="layer", bias=True),
                                dict(hidden_dim=48, no_scale_embedding=True)])
@torch.no_grad()
def test_full_forward_equals_prefill_plus_decode(kw):
    model = tiny(**kw)
    tokens = torch.randint(0, 97, (3, 29), generator=torch.Generator().manual_seed(1))
    full, _ = model(tokens)
    for prefill in (1, 13):      # 13: prefill ends inside a block and decoding crosses block boundaries
        stepped, _ = decode_stepwise(model, tokens, prefill)
        assert rel(stepped, full) < 1e-10
    # continuing with several tokens at once (block form with an initial state) too
    a, state = model(tokens[:, :11], use_cache=True)
    b, _ = model(tokens[:, 11:], state)
    assert rel(torch.cat([a, b], 1), full) < 1e-10


@pytest.mark.parametrize("kw", [dict(), dict(lrpe_layers=(0, 2), qk_act="1+elu"), dict(qk_act="none", norm="rms")])
@torch.no_grad()
def test_fp32_prefill_plus_decode_with_an_int_offset(kw, decode_path):
    """fp32 (the dtype the fused Triton step takes; conftest.decode_path runs it in the interpreter), a state
    without per-row positions (the int offset path): stepwise decoding equals the full forward to fp32 rounding,
    and a decode step at a wrong offset does not."""
    model = tiny(**kw).float()
    tokens = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    full, _ = model(tokens)
    stepped, state = decode_stepwise(model, tokens, 13)
    assert decode_path is None or len(decode_path) == 3 * 7
    assert rel(stepped, full) < 1e-5
    if kw.get("lrpe_layers"):
        _, prefix = model(tokens[:, :19], use_cache=True)
        shifted = DecodeState(kv=prefix.kv, offset=prefix.offset + 3)
        wrong, _ = model(tokens[:, 19:], shifted)
        assert rel(wrong[:, 0], full[:, 19]) > 1e-3


@torch.no_grad()
def test_decoding_depends_on_the_state():
    """Guards the test above: a decode step with a wrong offset or an empty state gives other logits."""
    model = tiny()
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    full, _ = model(tokens)
    _, state = model(tokens[:, :11], use_cache=True)
    wrong_offset = type(state)(kv=state.kv, offset=state.offset + 3)
    assert rel(model(tokens[:, 11:], wrong_offset)[0], full[:, 11:]) > 1e-6
    zero = type(state)(kv=[torch.zeros_like(s) for s in state.kv], offset=state.offset)
    assert rel(model(tokens[:, 11:], zero)[0], full[:, 11:]) > 1e-3


def test_lrpe_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    lrpe = LRPE(n_heads=2, head_dim=8).double()
    q, k = torch.randn(1, 1, 2, 8, dtype=torch.float64), torch.randn(1, 1, 2, 8, dtype=torch.float64)

    def score(s, t):
        return (lrpe(q, offset=s) * lrpe(k, offset=t)).sum(-1)     # per head

    for s, t in [(5, 2), (9, 9), (100, 40)]:
        for shift in (1, 17, 1000):
            assert torch.allclose(score(s, t), score(s + shift, t + shift), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(score(5, 2), score(6, 2), rtol=1e-3)      # a different gap, a different score
    # the doubled head dim: [x cos, x sin]
    assert lrpe(q, offset=0).shape[-1] == 16
    assert torch.allclose(lrpe(q, offset=0), torch.cat([q, torch.zeros_like(q)], -1))


def test_lrpe_theta_initialisation():
    lrpe = LRPE(n_heads=3, head_dim=4)
    d = 12
    want = torch.tensor([10000 ** (-2 * i / d) for i in range(d)]).reshape(3, 1, 4)
    assert lrpe.theta.shape == (3, 1, 4) and torch.allclose(lrpe.theta.detach(), want)


def test_released_decay_schedule_values():
    assert alibi_slopes(8) == pytest.approx([2 ** (-(h + 1)) for h in range(8)])
    # 6 heads: the 4 power-of-two slopes, then every other slope of the 8-head list
    assert alibi_slopes(6) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    cfg = TransNormerConfig(vocab_size=10, d_model=32, n_layers=5, n_heads=8, glu_dim=8)
    slopes = decay_slopes(cfg)
    for layer in range(5):
        for h in range(8):
            want = 2 ** (-8 * (h + 1) / 8) * (1 - layer / 4 + 1e-5)
            assert slopes[layer, h].item() == pytest.approx(want, rel=1e-12)
    one_layer = TransNormerConfig(vocab_size=10, d_model=32, n_layers=1, n_heads=8, glu_dim=8)
    assert decay_slopes(one_layer)[0].tolist() == pytest.approx(alibi_slopes(8))


def test_paper_decay_schedule_values():
    cfg = TransNormerConfig(vocab_size=10, d_model=32, n_layers=4, n_heads=8, glu_dim=8, decay="paper")
    lam = torch.exp(-decay_slopes(cfg))
    for layer in range(4):
        for h in range(8):
            assert lam[layer, h].item() == pytest.approx(math.exp(-(8 * h / 8) * (1 - layer / 4)), rel=1e-12)
    assert torch.all(lam[:, 0] == 1)          # head 0: no decay


def test_no_temperature_decay_schedule_values():
    # Table 4's "w/o temperature": the released ALiBi slopes, the same in every layer (no (1 - l/(L-1)) factor)
    cfg = TransNormerConfig(vocab_size=10, d_model=48, n_layers=4, n_heads=6, glu_dim=8, decay="no-temperature")
    slopes = decay_slopes(cfg)
    assert slopes.dtype == torch.float64 and slopes.shape == (4, 6)
    want = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]      # alibi_slopes(6), written out
    for layer in range(4):
        assert slopes[layer].tolist() == pytest.approx(want, rel=1e-15)
    # the last layer keeps its decay (the released schedule's factor takes it to ~0 there)
    released = decay_slopes(TransNormerConfig(vocab_size=10, d_model=48, n_layers=4, n_heads=6, glu_dim=8))
    assert released[-1].max().item() < 1e-4 < slopes[-1].min().item()


def test_model_uses_the_schedule():
    model = TransNormerLLM(TransNormerConfig(vocab_size=10, d_model=32, n_layers=3, n_heads=4, glu_dim=8))
    for i, layer in enumerate(model.layers):
        assert torch.allclose(layer.token_mixer.slope, decay_slopes(model.cfg)[i].float())
    assert not any(k.endswith("slope") for k in model.state_dict())   # a fixed buffer, not in checkpoints


@pytest.mark.parametrize("kw,message", [
    (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
    (dict(hidden_dim=34), "hidden_dim=34 is not divisible by n_heads=4"),
    (dict(decay="linear"), "unknown decay schedule 'linear'"),
    (dict(qk_act="relu"), "unknown q/k activation 'relu'"),
    (dict(norm="batch"), "unknown norm 'batch'"),
    (dict(lrpe_layers=(5,)), "lrpe_layers [5] out of range"),
    (dict(n_layers=0), "n_layers must be positive"),
])
def test_bad_config_fails_early(kw, message):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, glu_dim=48)
    with pytest.raises(ValueError) as err:
        TransNormerConfig(**{**base, **kw})
    assert message in str(err.value)


def test_bad_tokens_fail_early():
    model = tiny()
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="token id -1 is outside the vocabulary"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="empty input"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must be \[batch, length\]"):
        model(torch.tensor([1, 2, 3]))


def test_mismatched_checkpoint_names_the_tensor():
    model = tiny()
    sd = model.state_dict()
    sd["layers.1.channel_mixer.l3.weight"] = torch.zeros(32, 50)
    del sd["lm_head.weight"]
    with pytest.raises(ValueError) as err:
        load_checked(model, sd)
    msg = str(err.value)
    assert "layers.1.channel_mixer.l3.weight: checkpoint (32, 50) vs model (32, 48)" in msg
    assert "missing from checkpoint: ['lm_head.weight']" in msg


def test_trains():
    """A few optimiser steps on one batch lower the loss: gradients reach every parameter."""
    torch.manual_seed(0)
    model = TransNormerLLM(TransNormerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, glu_dim=48,
                                             block_size=8))
    tokens = torch.randint(0, 50, (4, 21))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                   if n != "embed_tokens.weight")
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_any_block_of_an_initial_value_equals_that_block_of_the_whole():
    """initializers(): a block made alone (what a tensor-parallel rank makes) equals the same block of the whole
    value, across the 256 x 256 tiles the random matrices are drawn in; the whole value is what the model holds."""
    from tnllm_plugin.model import INIT_TILE
    cfg = TransNormerConfig(vocab_size=600, d_model=64, n_layers=1, n_heads=4, hidden_dim=64, glu_dim=320,
                            lrpe_layers=(0,), bias=True, norm="layer", pad_id=300)
    torch.manual_seed(0)
    model = TransNormerLLM(cfg)
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    for name, make in model.initializers().items():
        whole = make()
        assert torch.equal(whole, state[name]), name
        for _ in range(6):
            index = tuple(slice(*sorted(torch.randint(0, n + 1, (2,), generator=g).tolist())) for n in whole.shape)
            assert torch.equal(make(index), whole[index]), (name, index)
    emb, head = state["embed_tokens.weight"], state["lm_head.weight"]
    assert not emb[300].any() and emb[299].any()                        # the padding row, and only it, is zero
    assert not torch.equal(head[:88], head[INIT_TILE:INIT_TILE + 88])   # tiles are drawn apart
    assert not torch.equal(emb[:88], head[:88])                         # so are parameters
    assert abs(head.std().item() - cfg.init_std) < 0.05 * cfg.init_std


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_chunked_lm_loss_equals_cross_entropy_of_the_logits(reduction):
    """Loss and every parameter's gradient (float64): the chunked head + loss on the hidden states against
    F.cross_entropy on the full logits, with padding targets and chunks that cut across batch rows."""
    model = tiny().train()
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 97, (3, 23), generator=g)
    target = tokens.roll(-1, 1)
    target[1, 15:] = model.cfg.pad_id
    weights = torch.rand(target.shape if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
    results = []
    for fused in (False, True):
        model.zero_grad()
        if fused:
            hidden, _ = model(tokens, return_hidden=True)
            loss = model.chunked_lm_loss(hidden, target, model.cfg.pad_id, reduction, chunk_size=10)
        else:
            logits, _ = model(tokens)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 97), target.reshape(-1),
                                                     ignore_index=model.cfg.pad_id, reduction=reduction)
            loss = loss.reshape(target.shape) if reduction == "none" else loss
        (loss * weights).sum().backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_ref, grads_ref), (loss_got, grads_got) = results
    assert loss_got.shape == loss_ref.shape and rel(loss_got, loss_ref) < 1e-12
    assert set(grads_got) == set(grads_ref)
    for name in grads_ref:
        assert rel(grads_got[name], grads_ref[name]) < 1e-10, name


def test_chunked_lm_loss_refuses_a_vocab_parallel_head():
    model = tiny()
    model.vocab_parallel = True
    with pytest.raises(ValueError, match="vocab-parallel"):
        model.chunked_lm_loss(torch.zeros(1, 2, 32, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.long))
