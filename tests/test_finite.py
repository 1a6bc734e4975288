"""Non-finite values (issue 16, item 3): tnllm_plugin.finite.FiniteCheck names the step, the layer and the tensor
of the first NaN / inf (in the inputs, produced in an attention state, carried in a decode state) instead of letting
it propagate, costs nothing once removed; and a long prompt (40k tokens of the tiny preset) decodes to finite logits
equal to the block form's, in fp32 and in bf16."""
import pytest
import torch

from tnllm_plugin.finite import FiniteCheck, NonFiniteError
from tnllm_plugin.generation import SamplingConfig, decode_steps, generate
from tnllm_plugin.model import TransNormerConfig, TransNormerLLM
from tnllm_plugin.presets import preset_config

VOCAB = 50


def small():
    torch.manual_seed(0)
    return TransNormerLLM(TransNormerConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, glu_dim=48)).eval()


def tokens(n=40, seed=0):
    return torch.randint(3, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_nan_in_an_embedding_row_names_the_token_and_the_call():
    model = small()
    model.embed_tokens.weight[7, 3] = float("nan")
    t = tokens()
    t[t == 7] = 8
    with FiniteCheck(model):
        model(t)                                    # call 1: no token 7, passes
        t[1, 17] = 7
        with pytest.raises(NonFiniteError, match=r"^NaN in forward call 2, embedding output \[batch, position, "
                                                 r"channel\] \(1 of 2560 values, the first at \(1, 17, 3\)\) "
                                                 r"\(the rows of token ids \[7\]\)$"):
            model(t)
    assert not model(t)[0].isfinite().all()         # unchecked, the NaN spreads silently to the logits


@torch.no_grad()
def test_inf_produced_in_an_attention_state_names_the_layer():
    model = small()
    model.layers[1].token_mixer.qkvu_proj.weight.mul_(1e25)      # k v^T overflows fp32 in layer 1's state
    # the overflowed products are +inf and -inf: their sums in the state are inf or NaN by the CPU's summation
    # order (inf alone on the CI machines so far, NaN and inf on an AMD EPYC with AVX2): either names the layer
    with pytest.raises(NonFiniteError, match=r"^(NaN/)?inf in forward call 1, layer 1: attention state \[batch, head, "
                                             r"key, value\] \(\d+ of \d+ values, the first at \(0, \d+, \d+, \d+\)\)"):
        with FiniteCheck(model):
            model(tokens())


@torch.no_grad()
def test_nan_carried_in_a_decode_state_names_the_layer_and_the_decode_step():
    model = small()
    t = tokens()
    with FiniteCheck(model) as check:
        _, state = model(t, use_cache=True)                     # call 1: the prefill
        _, state = model(t[:, :1], state)                       # call 2: one decode step
        state.kv[2][1, 3, 0, 5] = float("nan")                  # a corrupted state (a bad kernel, a bad copy)
        with pytest.raises(NonFiniteError, match=r"^NaN in forward call 3, layer 2: incoming attention state "
                                                 r"\[batch, head, key, value\] \(1 of \d+ values, the first at "
                                                 r"\(1, 3, 0, 5\)\)"):
            model(t[:, :1], state)
        assert check.calls == 3


@torch.no_grad()
def test_norm_input_overflow_is_refused_although_every_tensor_is_finite():
    """|x| ~ 1e20 entering an SRMSNorm: its fp32 mean square is inf and the norm returns zeros, so every tensor
    downstream is finite and wrong; the check refuses the block output that carries it."""
    model = small()
    model.layers[0].channel_mixer.l3.weight.mul_(1e24)
    assert model(tokens())[0].isfinite().all()
    with pytest.raises(NonFiniteError, match=r"^overflow in forward call 1, layer 0: block output .*mean square "
                                             r"overflows fp32"):
        with FiniteCheck(model):
            model(tokens())


@torch.no_grad()
def test_the_check_changes_no_result_and_is_gone_once_removed():
    model = small()
    prompts = [tokens(30)[0].tolist(), tokens(7)[1].tolist()]
    plain = generate(model, prompts, SamplingConfig(max_new_tokens=6))
    with FiniteCheck(model) as check:
        checked = generate(model, prompts, SamplingConfig(max_new_tokens=6))
    assert checked == plain and check.calls == 6      # the prefill and one call per decoded token after the first
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_long_prompt_decodes_finite_and_equal_to_the_block_form(dtype):
    """40k tokens of the tiny preset (init_std 0.2, so that the attention moves the logits). The last layer barely
    decays (lambda = exp(-slope * 1e-5)), so its state grows with the prompt (to ~4e4 here; for 1M tokens on a GPU:
    benchmarks/long_context.py); decoding after the prompt must stay finite and give the logits of one block-form
    forward over the whole sequence."""
    torch.manual_seed(0)
    model = TransNormerLLM(preset_config("tiny", vocab_size=1000, init_std=0.2)).eval().to(dtype)
    prompt = torch.randint(3, 1000, (40_000,), generator=torch.Generator().manual_seed(1)).tolist()
    with FiniteCheck(model):
        steps = list(decode_steps(model, [prompt], SamplingConfig(max_new_tokens=8)))
    new = [s.chosen[0] for s in steps]
    decoded = torch.stack([s.logits[0].float() for s in steps])
    hidden, state = model(torch.tensor([prompt + new[:-1]]), use_cache=True, return_hidden=True)
    block = model.lm_head(hidden[0, -len(new):]).float()
    assert decoded.isfinite().all() and all(s.isfinite().all() for s in state.kv)
    assert state.kv[-1].abs().max() > 1e4            # the long-memory state did grow
    err = ((decoded - block).norm() / block.norm()).item()
    # bf16: at most a rounding step on a few logits (a decay 0.1% off in the recurrence gives 7e-3; fp32: 4e-5)
    assert err < (1e-5 if dtype == torch.float32 else 3e-3), err
    if dtype == torch.float32:
        assert new == block.argmax(-1).tolist()      # greedy decoding picks the block form's argmax
