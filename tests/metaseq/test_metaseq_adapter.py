"""The Metaseq host adapter (tnllm_plugin/metaseq_adapter.py) against the real, patched Metaseq (these tests run
in the environment of scripts/ensure_metaseq.sh): its registries, ``build_model``, ``build_criterion``,
BaseModel/BaseDecoder, metrics and SequenceGenerator. End-to-end runs of metaseq-train, metaseq-validate and
the generator live beside this file."""
import math
import re
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from metaseq.criterions import CRITERION_REGISTRY, build_criterion
from metaseq.data import Dictionary
from metaseq.logging import metrics
from metaseq.models import (ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY, MODEL_REGISTRY,
                            build_model)

from tnllm_plugin import host_common, metaseq_adapter

PRESET_NAMES = ["tiny", "385m", "1b", "3b", "7b", "13b", "65b", "175b"]
# Table 10 of the paper (layers, d_model, heads); glu_dim as presets.py documents (8/3 d, up to 256)
TABLE10 = {"385m": (24, 1024, 8, 2816), "1b": (16, 2048, 16, 5632), "3b": (32, 2560, 20, 6912),
           "7b": (30, 4096, 32, 11008), "13b": (36, 5120, 40, 13824), "65b": (72, 8192, 64, 22016),
           "175b": (88, 12288, 96, 32768), "tiny": (2, 64, 4, 128)}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def make_task(n_words=36):
    """Metaseq's Dictionary (bos 0, pad 1, eos 2, unk 3) with 40 symbols, as a task's target dictionary."""
    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    return d, Namespace(target_dictionary=d, source_dictionary=d)


def build(arch="transnormer_llm_tiny", **over):
    """What metaseq-train does for --arch: the architecture fills the arguments, build_model builds."""
    d, task = make_task()
    args = Namespace(arch=arch, **over)
    ARCH_CONFIG_REGISTRY[arch](args)
    torch.manual_seed(0)
    return build_model(args, task).eval(), d, task


def tokens_for(d, shape, seed):
    return torch.randint(d.nspecial, len(d), shape, generator=torch.Generator().manual_seed(seed))


def test_registries():
    cls = metaseq_adapter.TransNormerLanguageModel
    assert MODEL_REGISTRY["transnormer_llm"] is cls
    for name in PRESET_NAMES:
        assert ARCH_MODEL_REGISTRY[f"transnormer_llm_{name}"] is cls
        assert ARCH_MODEL_NAME_REGISTRY[f"transnormer_llm_{name}"] == "transnormer_llm"
    assert CRITERION_REGISTRY["transnormer_llm_cross_entropy"] is metaseq_adapter.TransNormerCrossEntropy


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_architecture_fills_table10_shape(name):
    args = Namespace()
    ARCH_CONFIG_REGISTRY[f"transnormer_llm_{name}"](args)
    cfg = host_common.config_from_args(args, make_task(64000 - 4)[0])
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.glu_dim) == TABLE10[name]
    assert cfg.hidden_dim == cfg.d_model and cfg.lrpe_layers == (0,) and cfg.decay == "released"
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (1, 0, 2)


def test_architecture_keeps_command_line_values():
    args = Namespace(decoder_layers=3, glu_dim=100, lrpe_layers="0,2", norm_type="layer")
    ARCH_CONFIG_REGISTRY["transnormer_llm_385m"](args)
    cfg = host_common.config_from_args(args, make_task()[0])
    assert (cfg.n_layers, cfg.d_model, cfg.glu_dim, cfg.lrpe_layers, cfg.norm) == (3, 1024, 100, (0, 2), "layer")


@torch.no_grad()
def test_incremental_decoding_equals_full_forward():
    model, d, _ = build(lrpe_layers="0,1")
    assert isinstance(model, metaseq_adapter.TransNormerLanguageModel) and model.decoder.dictionary is d
    tokens = tokens_for(d, (3, 23), 0)
    full = model(tokens)[0]
    inc = {}
    outs = [model(tokens[:, :9], incremental_state=inc)[0]]      # metaseq's generator prefills via the model
    for t in range(10, 24):                                       # then passes the whole prefix to the decoder
        outs.append(model.decoder(tokens[:, :t], incremental_state=inc)[0])
        assert outs[-1].shape == (3, 1, len(d))
    assert full.dtype == torch.float32 and rel(torch.cat(outs, 1), full) < 1e-5
    (state,) = inc.values()
    assert state.offset == 23 and len(state.kv) == 2
    lprobs = model.get_normalized_probs(full, log_probs=True)        # BaseModel -> BaseDecoder, on logits
    assert torch.allclose(lprobs, full.log_softmax(-1), atol=1e-6)
    assert torch.equal(model.get_normalized_probs((full, None), log_probs=True), lprobs)


@torch.no_grad()
def test_features_and_output_layer_compose_to_forward():
    model, d, _ = build()
    tokens = tokens_for(d, (2, 7), 3)
    feats, _ = model.decoder.extract_features(tokens)
    assert feats.shape == (2, 7, 64)
    assert rel(model.decoder.output_layer(feats), model(tokens)[0]) < 1e-6
    inc = {}
    prefill = model.decoder.extract_features(tokens[:, :5], incremental_state=inc)[0]
    step = model.decoder.extract_features(tokens[:, :6], incremental_state=inc)[0]
    assert step.shape == (2, 1, 64) and rel(torch.cat([prefill, step], 1), feats[:, :6]) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("method", ["reorder_incremental_state", "reorder_incremental_state_scripting"])
def test_reorder_incremental_state(method):
    # the second name is the one metaseq's EnsembleModel calls
    model, d, _ = build()
    tokens = tokens_for(d, (3, 12), 1)
    inc = {}
    model(tokens[:, :11], incremental_state=inc)
    order = torch.tensor([2, 0, 0])
    getattr(model.decoder, method)(inc, order)
    step = model.decoder(tokens[order], incremental_state=inc)[0]
    full = model(tokens[order])[0]
    assert step.shape == (3, 1, len(d)) and rel(step[:, -1], full[:, -1]) < 1e-5


def test_criterion_and_metrics():
    model, d, task = build()
    crit = build_criterion(Namespace(criterion="transnormer_llm_cross_entropy"), task)
    assert isinstance(crit, metaseq_adapter.TransNormerCrossEntropy) and crit.padding_idx == d.pad()
    tokens = tokens_for(d, (2, 10), 2)
    target = tokens.roll(-1, 1)
    padded = target.clone()
    padded[1, 6:] = d.pad()
    sample = {"net_input": {"src_tokens": tokens}, "target": padded, "ntokens": int(padded.ne(d.pad()).sum())}
    loss, sample_size, log = crit(model, sample)
    logits = model(tokens)[0]
    want = F.cross_entropy(logits[0], target[0], reduction="sum") + \
        F.cross_entropy(logits[1, :6], target[1, :6], reduction="sum")
    assert sample_size == 16 and log["nsentences"] == 2 and log["ntokens"] == 16
    assert torch.allclose(loss, want, rtol=1e-5)
    assert loss.requires_grad     # the training loss, not a detached copy
    per_token, _, _ = crit(model, sample, reduce=False)
    assert per_token.shape == (20,) and (per_token.view(2, 10)[1, 6:] == 0).all()
    with metrics.aggregate(new_root=True) as agg:
        metaseq_adapter.TransNormerCrossEntropy.reduce_metrics([log])
        values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(want.item() / 16 / math.log(2), abs=1e-3)
    assert values["ppl"] == pytest.approx(2 ** values["loss"], rel=1e-2)
    assert metaseq_adapter.TransNormerCrossEntropy.logging_outputs_can_be_summed()


@pytest.mark.parametrize("reduce", [True, False])
def test_criterion_gradients_equal_those_of_the_full_logits_without_making_them(reduce):
    """The criterion has the model compute its loss (chunked LM head + loss: the LM head module never runs); the
    loss and every gradient are those of cross entropy on the full logits, to fp32 rounding."""
    model, d, task = build()
    model.train()
    crit = build_criterion(Namespace(criterion="transnormer_llm_cross_entropy"), task)
    tokens = tokens_for(d, (3, 17), 5)
    target = tokens.roll(-1, 1)
    target[2, 11:] = d.pad()
    sample = {"net_input": {"src_tokens": tokens}, "target": target, "ntokens": int(target.ne(d.pad()).sum())}
    weights = (torch.rand(target.numel(), generator=torch.Generator().manual_seed(6)) + 0.5
               if not reduce else torch.tensor(0.7))
    results = []
    head_calls = []
    hook = model.decoder.transnormer.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    for loss_fn in (lambda: crit(model, sample, reduce=reduce)[0],
                    lambda: host_common.model_cross_entropy(model, model(tokens)[0], target, d.pad(), reduce)):
        model.zero_grad()
        loss = loss_fn()
        (loss * weights).sum().backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}, len(head_calls)))
    hook.remove()
    (loss, grads, calls), (want, want_grads, _) = results
    assert calls == 0
    assert loss.shape == want.shape and rel(loss, want) < 1e-6
    for k in want_grads:
        assert rel(grads[k], want_grads[k]) < 1e-5, k


def test_mismatched_checkpoint_names_the_tensor():
    model, _, _ = build()
    sd = model.state_dict()
    key = "decoder.transnormer.layers.1.channel_mixer.l1.weight"
    sd[key] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=re.escape(f"{key}: checkpoint (3, 64) vs model (128, 64)")):
        model.load_state_dict(sd)


def test_non_strict_load_allows_missing_tensors():
    # metaseq's EMA restores with strict=False; a missing tensor is reported back, not raised
    model, _, _ = build()
    sd = model.state_dict()
    del sd["decoder.transnormer.lm_head.weight"]
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["decoder.transnormer.lm_head.weight"]


def test_checkpoint_activations_option():
    plain, _, _ = build()
    ckpt, _, _ = build(checkpoint_activations=True)
    assert not any(getattr(b, "activation_checkpointing", False) for b in plain.decoder.transnormer.layers)
    assert all(b.activation_checkpointing for b in ckpt.decoder.transnormer.layers)
    tokens = tokens_for(make_task()[0], (2, 9), 5)
    for m in (plain, ckpt):
        m.train()
        m.zero_grad()
        m(tokens)[0].square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_keep_linear_inputs_option():
    """--keep-linear-inputs parses as Metaseq's argparse models' options do and reaches every mixer."""
    import argparse
    parser = argparse.ArgumentParser()
    metaseq_adapter.TransNormerLanguageModel.add_args(parser)
    assert parser.parse_args(["--keep-linear-inputs"]).keep_linear_inputs
    assert not parser.parse_args([]).keep_linear_inputs
    default, _, _ = build()
    kept, _, _ = build(keep_linear_inputs=True)
    mixers = lambda m: [x for b in m.decoder.transnormer.layers for x in (b.token_mixer, b.channel_mixer)]  # noqa
    assert all(x.recompute_linear_inputs for x in mixers(default))
    assert not any(x.recompute_linear_inputs for x in mixers(kept))


@torch.no_grad()
def test_sequence_generator_greedy_matches_full_forward():
    # metaseq's own generator: prefill through the model, then the whole prefix to the decoder each step
    from metaseq.sequence_generator import SequenceGenerator
    model, d, _ = build()
    words = torch.randint(d.nspecial, len(d), (2, 5), generator=torch.Generator().manual_seed(4))
    prompt = torch.cat([torch.full((2, 1), d.eos()), words], 1)     # metaseq's prompts start with </s>
    gen = SequenceGenerator([model], d, beam_size=1, max_len_b=13, topp=0)     # topp 0: greedy
    result = gen.generate([model], {"net_input": {"src_tokens": prompt}})
    out, scores = result["tokens"][:, 0], result["scores"][:, 0]
    want, want_scores = prompt, []
    while want.shape[1] < 12:                    # greedy by full forward, with the generator's bans
        lprobs = model(want)[0][:, -1].log_softmax(-1)
        lprobs[:, [d.eos(), d.pad()]] = -math.inf
        best = lprobs.max(-1)
        want, want_scores = torch.cat([want, best.indices[:, None]], 1), want_scores + [best.values]
    assert out.shape == (2, 13) and torch.equal(out[:, :12], want)
    assert torch.allclose(scores[:, 6:12], torch.stack(want_scores, 1), atol=1e-5)   # each step's log-prob
    assert (out[:, 12] == d.eos()).all()         # the generator ends every sequence at max_len


def test_torch_adamw_optimizer_equals_torch_adamw_and_takes_bf16_grads():
    # --optimizer torch_adamw: Metaseq's adam options on torch.optim.AdamW; FSDP's mixed precision hands it bf16
    # gradients of fp32 parameters
    from metaseq.optim import build_optimizer
    cfg = Namespace(optimizer="torch_adamw", lr=[1e-2], adam_betas="(0.9, 0.95)", adam_eps=1e-8, weight_decay=0.1,
                    use_old_adam=False, fp16_adam_stats=False)
    ours, ref = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ref.load_state_dict(ours.state_dict())
    opt = build_optimizer(cfg, list(ours.parameters()))
    assert isinstance(opt, metaseq_adapter.TorchAdamW) and opt.supports_flat_params
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(3):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        for m in (ours, ref):
            m.zero_grad()
            m(x).square().sum().backward()
        for p in ours.parameters():
            if hasattr(p, "grad_dtype"):    # torch >= 2.10 checks a gradient's dtype unless told not to
                p.grad_dtype = None
            p.grad = p.grad.bfloat16()
        for p in ref.parameters():
            p.grad = p.grad.bfloat16().float()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and torch.allclose(p, q, rtol=0, atol=1e-7)
