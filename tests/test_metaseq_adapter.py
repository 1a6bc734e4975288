"""The Metaseq host adapter (tnllm_plugin/metaseq_adapter.py).

Metaseq is not on PyPI (the package of that name there is another project) and does not import on Python
3.11, so this file has two parts:
  * tests named ``test_real_*`` run only where the real Metaseq imports (``pytest.importorskip``) and go
    through its own registries, ``build_model``, ``build_criterion``, BaseModel/BaseDecoder, metrics and
    SequenceGenerator;
  * every other test imports the adapter afresh under a stand-in ``metaseq`` (see ``_standin_metaseq``),
    which checks the adapter's own logic: registration, presets, incremental decoding, reordering, the
    criterion's value, checkpoint checks. It cannot tell whether the adapter matches Metaseq's real API.
"""
import argparse
import importlib
import math
import re
import sys
import types
import uuid
from argparse import Namespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tnllm_plugin

ADAPTER = "tnllm_plugin.metaseq_adapter"
PRESET_NAMES = ["tiny", "385m", "1b", "3b", "7b", "13b", "65b", "175b"]
# Table 10 of the paper (layers, d_model, heads); glu_dim as presets.py documents (8/3 d, up to 256)
TABLE10 = {"385m": (24, 1024, 8, 2816), "1b": (16, 2048, 16, 5632), "3b": (32, 2560, 20, 6912),
           "7b": (30, 4096, 32, 11008), "13b": (36, 5120, 40, 13824), "65b": (72, 8192, 64, 22016),
           "175b": (88, 12288, 96, 32768), "tiny": (2, 64, 4, 128)}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- the stand-in ---------------------------------------------------------------------------------------

def _standin_metaseq():
    """A fake ``metaseq`` that mirrors ONLY the API surface metaseq_adapter.py uses, with the behaviour
    Metaseq's source gives it (facebookresearch/metaseq: models/__init__.py, models/base_model.py,
    models/base_decoder.py, incremental_decoding_utils.py, criterions/base_criterion.py, registry.py,
    logging/metrics.py, utils.get_perplexity): registries are dicts, registration refuses duplicates and
    classes not derived from the base, BaseDecoder keeps ``dictionary`` and stores incremental state under a
    per-module uuid key, BaseModel forwards to its decoder, BaseCriterion takes padding_idx from the task.
    It is no substitute for Metaseq: the ``test_real_*`` tests exercise the real one."""
    def module(name, package=False):
        m = types.ModuleType(name)
        if package:
            m.__path__ = []
        return m

    root, models, criterions = (module("metaseq", True), module("metaseq.models", True),
                                module("metaseq.criterions", True))
    logging_pkg, metrics, utils = (module("metaseq.logging", True), module("metaseq.logging.metrics"),
                                   module("metaseq.utils"))

    # metaseq.logging.metrics: here the logged values are recorded instead of aggregated into meters
    metrics.SCALARS, metrics.DERIVED = {}, {}

    def log_scalar(key, value, weight=1, priority=10, round=None):
        metrics.SCALARS[key] = (float(value), weight)

    def log_derived(key, fn, priority=20):
        metrics.DERIVED[key] = fn
    metrics.log_scalar, metrics.log_derived = log_scalar, log_derived
    utils.get_perplexity = lambda loss, round=2, base=2: base ** loss

    class BaseDecoder(nn.Module):
        def __init__(self, dictionary):
            super().__init__()
            self.dictionary = dictionary
            self._incremental_state_id = str(uuid.uuid4())

        def get_incremental_state(self, incremental_state, key):
            full_key = f"{self._incremental_state_id}.{key}"
            if incremental_state is None or full_key not in incremental_state:
                return None
            return incremental_state[full_key]

        def set_incremental_state(self, incremental_state, key, value):
            if incremental_state is not None:
                incremental_state[f"{self._incremental_state_id}.{key}"] = value
            return incremental_state

        def reorder_incremental_state(self, incremental_state, new_order):
            pass

    class BaseModel(nn.Module):
        def __init__(self, decoder):
            super().__init__()
            assert isinstance(decoder, BaseDecoder)
            self.decoder = decoder

        def forward(self, src_tokens, **kwargs):
            return self.decoder(src_tokens, **kwargs)

        def get_targets(self, sample):
            return sample["target"]

    models.MODEL_REGISTRY, models.ARCH_MODEL_REGISTRY, models.ARCH_CONFIG_REGISTRY = {}, {}, {}

    def register_model(name):
        def register(cls):
            if name in models.MODEL_REGISTRY or not issubclass(cls, BaseModel):
                raise ValueError(f"cannot register model {name}")
            models.MODEL_REGISTRY[name] = cls
            return cls
        return register

    def register_model_architecture(model_name, arch_name):
        def register(fn):
            if model_name not in models.MODEL_REGISTRY or arch_name in models.ARCH_MODEL_REGISTRY:
                raise ValueError(f"cannot register architecture {arch_name}")
            models.ARCH_MODEL_REGISTRY[arch_name] = models.MODEL_REGISTRY[model_name]
            models.ARCH_CONFIG_REGISTRY[arch_name] = fn
            return fn
        return register

    class BaseCriterion(nn.modules.loss._Loss):
        def __init__(self, task):
            super().__init__()
            self.task = task
            self.padding_idx = task.target_dictionary.pad()

    criterions.CRITERION_REGISTRY = {}

    def register_criterion(name):
        def register(cls):
            if name in criterions.CRITERION_REGISTRY or not issubclass(cls, BaseCriterion):
                raise ValueError(f"cannot register criterion {name}")
            criterions.CRITERION_REGISTRY[name] = cls
            return cls
        return register

    models.BaseDecoder, models.BaseModel = BaseDecoder, BaseModel
    models.register_model, models.register_model_architecture = register_model, register_model_architecture
    criterions.BaseCriterion, criterions.register_criterion = BaseCriterion, register_criterion
    root.models, root.criterions, root.logging, root.utils, logging_pkg.metrics = \
        models, criterions, logging_pkg, utils, metrics
    return {m.__name__: m for m in (root, models, criterions, logging_pkg, metrics, utils)}


def _is_metaseq_or_adapter(name):
    return name == "metaseq" or name.startswith("metaseq.") or name == ADAPTER


@pytest.fixture
def ms():
    """The adapter imported afresh under the stand-in; sys.modules and the package are restored afterwards."""
    saved = {k: v for k, v in sys.modules.items() if _is_metaseq_or_adapter(k)}
    saved_attr = tnllm_plugin.__dict__.get("metaseq_adapter")
    for k in saved:
        del sys.modules[k]
    fake = _standin_metaseq()
    sys.modules.update(fake)
    try:
        adapter = importlib.import_module(ADAPTER)
        yield Namespace(adapter=adapter, models=fake["metaseq.models"], criterions=fake["metaseq.criterions"],
                        metrics=fake["metaseq.logging.metrics"])
    finally:
        for k in [k for k in sys.modules if _is_metaseq_or_adapter(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        if saved_attr is None:
            tnllm_plugin.__dict__.pop("metaseq_adapter", None)
        else:
            tnllm_plugin.metaseq_adapter = saved_attr


class TinyDictionary:
    """Metaseq's Dictionary order of the specials (bos 0, pad 1, eos 2, unk 3) and its pad/bos/eos/len."""

    def __init__(self, n=40):
        self.n, self.nspecial = n, 4

    def __len__(self):
        return self.n

    def bos(self):
        return 0

    def pad(self):
        return 1

    def eos(self):
        return 2


def build(ms, arch="transnormer_llm_tiny", **over):
    d = TinyDictionary()
    task = Namespace(target_dictionary=d, source_dictionary=d)
    args = Namespace(arch=arch, **over)
    ms.models.ARCH_CONFIG_REGISTRY[arch](args)
    torch.manual_seed(0)
    return ms.adapter.TransNormerLanguageModel.build_model(args, task).eval(), d, task


def tokens_for(d, shape, seed):
    return torch.randint(d.nspecial, len(d), shape, generator=torch.Generator().manual_seed(seed))


# --- under the stand-in (always run) -----------------------------------------------------------------------

def test_registers_model_architectures_and_criterion(ms):
    cls = ms.adapter.TransNormerLanguageModel
    assert ms.models.MODEL_REGISTRY == {"transnormer_llm": cls}
    assert set(ms.models.ARCH_MODEL_REGISTRY) == {f"transnormer_llm_{n}" for n in PRESET_NAMES}
    assert all(c is cls for c in ms.models.ARCH_MODEL_REGISTRY.values())
    assert ms.criterions.CRITERION_REGISTRY == {"transnormer_llm_cross_entropy": ms.adapter.TransNormerCrossEntropy}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_architecture_fills_table10_shape(ms, name):
    args = Namespace()
    ms.models.ARCH_CONFIG_REGISTRY[f"transnormer_llm_{name}"](args)
    cfg = ms.adapter.config_from_args(args, TinyDictionary(64000))
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.glu_dim) == TABLE10[name]
    assert cfg.hidden_dim == cfg.d_model and cfg.lrpe_layers == (0,) and cfg.decay == "released"
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id) == (1, 0, 2)


def test_architecture_keeps_command_line_values(ms):
    args = Namespace(decoder_layers=3, glu_dim=100, lrpe_layers="0,2", norm_type="layer")
    ms.models.ARCH_CONFIG_REGISTRY["transnormer_llm_385m"](args)
    cfg = ms.adapter.config_from_args(args, TinyDictionary())
    assert (cfg.n_layers, cfg.d_model, cfg.glu_dim, cfg.lrpe_layers, cfg.norm) == (3, 1024, 100, (0, 2), "layer")


def argument_names(model_cls):
    parser = argparse.ArgumentParser()
    model_cls.add_args(parser)
    return sorted(a.dest for a in parser._actions)


@pytest.mark.parametrize("over", [{}, {"decoder_layers": 5, "bias": True, "qk_act": "1+elu"}])
def test_same_arguments_and_defaults_as_fairseq_adapter(ms, over):
    pytest.importorskip("fairseq")
    from fairseq.models import ARCH_CONFIG_REGISTRY as FAIRSEQ_ARCHS

    from tnllm_plugin import fairseq_adapter
    # --bf16-autocast is fairseq-only: fairseq 0.12's --bf16 is its TPU mode, Metaseq's own --bf16 works on GPUs
    assert argument_names(ms.adapter.TransNormerLanguageModel) == \
        [a for a in argument_names(fairseq_adapter.TransNormerLanguageModel) if a != "bf16_autocast"]
    for name in PRESET_NAMES:
        ours, theirs = Namespace(**over), Namespace(**over)
        ms.models.ARCH_CONFIG_REGISTRY[f"transnormer_llm_{name}"](ours)
        FAIRSEQ_ARCHS[f"transnormer_llm_{name}"](theirs)
        assert vars(ours) == vars(theirs), name


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(ms):
    model, d, _ = build(ms, lrpe_layers="0,1")
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


@torch.no_grad()
def test_features_and_output_layer_compose_to_forward(ms):
    model, d, _ = build(ms)
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
def test_reorder_incremental_state(ms, method):
    # the second name is the one metaseq's EnsembleModel calls
    model, d, _ = build(ms)
    tokens = tokens_for(d, (3, 12), 1)
    inc = {}
    model(tokens[:, :11], incremental_state=inc)
    order = torch.tensor([2, 0, 0])
    getattr(model.decoder, method)(inc, order)
    step = model.decoder(tokens[order], incremental_state=inc)[0]
    full = model(tokens[order])[0]
    assert step.shape == (3, 1, len(d)) and rel(step[:, -1], full[:, -1]) < 1e-5


def test_criterion_sums_cross_entropy_over_non_padding(ms):
    model, d, task = build(ms)
    tokens = tokens_for(d, (2, 10), 2)
    target = tokens.roll(-1, 1)
    padded = target.clone()
    padded[1, 6:] = d.pad()
    crit = ms.adapter.TransNormerCrossEntropy(task)
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": torch.tensor([10, 6])}, "target": padded,
              "ntokens": int(padded.ne(d.pad()).sum())}
    loss, sample_size, log = crit(model, sample)
    logits = model(tokens)[0]
    want = F.cross_entropy(logits[0], target[0], reduction="sum") + \
        F.cross_entropy(logits[1, :6], target[1, :6], reduction="sum")
    assert sample_size == 16 and log["nsentences"] == 2 and log["ntokens"] == 16
    assert torch.allclose(loss, want, rtol=1e-5)
    assert loss.requires_grad     # the training loss, not a detached copy
    per_token, _, _ = crit(model, sample, reduce=False)
    assert per_token.shape == (20,) and (per_token.view(2, 10)[1, 6:] == 0).all()


def test_reduce_metrics_logs_base2_loss_and_perplexity(ms):
    logs = [{"loss": torch.tensor(12.0), "sample_size": 10}, {"loss": torch.tensor(3.0), "sample_size": 5}]
    ms.adapter.TransNormerCrossEntropy.reduce_metrics(logs)
    value, weight = ms.metrics.SCALARS["loss"]
    assert weight == 15 and value == pytest.approx(1.0 / math.log(2))
    assert ms.metrics.DERIVED["ppl"]({"loss": Namespace(avg=3.0)}) == pytest.approx(8.0)
    assert ms.adapter.TransNormerCrossEntropy.logging_outputs_can_be_summed()


def test_mismatched_checkpoint_names_the_tensor(ms):
    model, _, _ = build(ms)
    sd = model.state_dict()
    key = "decoder.transnormer.layers.0.token_mixer.qkvu_proj.weight"
    sd[key] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=re.escape(f"{key}: checkpoint (5, 5) vs model (256, 64)")):
        model.load_state_dict(sd)


def test_non_strict_load_allows_missing_tensors(ms):
    # metaseq's EMA restores with strict=False; a missing tensor is reported back, not raised
    model, _, _ = build(ms)
    sd = model.state_dict()
    del sd["decoder.transnormer.lm_head.weight"]
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["decoder.transnormer.lm_head.weight"]


def test_model_parallel_is_refused(ms):
    with pytest.raises(ValueError, match="model-parallel-size"):
        build(ms, model_parallel_size=2)


def test_checkpoint_activations_option(ms):
    plain, _, _ = build(ms)
    ckpt, _, _ = build(ms, checkpoint_activations=True)
    assert not any(getattr(b, "activation_checkpointing", False) for b in plain.decoder.transnormer.layers)
    assert all(b.activation_checkpointing for b in ckpt.decoder.transnormer.layers)


# --- the real Metaseq (skipped where it does not import) -----------------------------------------------------

@pytest.fixture
def real():
    pytest.importorskip("metaseq.models")
    from metaseq.data import Dictionary

    from tnllm_plugin import metaseq_adapter
    d = Dictionary()
    for i in range(40):
        d.add_symbol(f"w{i}")
    return metaseq_adapter, d, Namespace(target_dictionary=d, source_dictionary=d)


def real_build(task, arch="transnormer_llm_tiny", **over):
    from metaseq.models import ARCH_CONFIG_REGISTRY, build_model
    args = Namespace(arch=arch, **over)
    ARCH_CONFIG_REGISTRY[arch](args)      # what metaseq's option parsing does for --arch
    torch.manual_seed(0)
    return build_model(args, task).eval()


def test_real_registries(real):
    adapter, _, _ = real
    from metaseq.criterions import CRITERION_REGISTRY
    from metaseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    assert MODEL_REGISTRY["transnormer_llm"] is adapter.TransNormerLanguageModel
    for name in PRESET_NAMES:
        assert ARCH_MODEL_REGISTRY[f"transnormer_llm_{name}"] is adapter.TransNormerLanguageModel
        assert ARCH_MODEL_NAME_REGISTRY[f"transnormer_llm_{name}"] == "transnormer_llm"
    assert CRITERION_REGISTRY["transnormer_llm_cross_entropy"] is adapter.TransNormerCrossEntropy


@torch.no_grad()
def test_real_build_model_and_incremental_decoding(real):
    adapter, d, task = real
    model = real_build(task, lrpe_layers="0,1")
    assert isinstance(model, adapter.TransNormerLanguageModel) and model.decoder.dictionary is d
    tokens = torch.randint(d.nspecial, len(d), (3, 23), generator=torch.Generator().manual_seed(0))
    full = model(tokens)[0]
    inc = {}
    outs = [model(tokens[:, :9], incremental_state=inc)[0]]
    for t in range(10, 24):
        outs.append(model.decoder(tokens[:, :t], incremental_state=inc)[0])
    assert rel(torch.cat(outs, 1), full) < 1e-5
    lprobs = model.get_normalized_probs(full, log_probs=True)        # BaseModel -> BaseDecoder, on logits
    assert torch.allclose(lprobs, full.log_softmax(-1), atol=1e-6)
    order = torch.tensor([2, 0, 0])
    model.decoder.reorder_incremental_state_scripting(inc, order)
    step = model.decoder(torch.cat([tokens[order], tokens[order, :1]], 1), incremental_state=inc)[0]
    want = model(torch.cat([tokens[order], tokens[order, :1]], 1))[0][:, -1]
    assert rel(step[:, -1], want) < 1e-5


def test_real_criterion_and_metrics(real):
    adapter, d, task = real
    from metaseq.criterions import build_criterion
    from metaseq.logging import metrics
    model = real_build(task)
    crit = build_criterion(Namespace(criterion="transnormer_llm_cross_entropy"), task)
    assert isinstance(crit, adapter.TransNormerCrossEntropy) and crit.padding_idx == d.pad()
    tokens = torch.randint(d.nspecial, len(d), (2, 10), generator=torch.Generator().manual_seed(2))
    target = tokens.roll(-1, 1)
    padded = target.clone()
    padded[1, 6:] = d.pad()
    sample = {"net_input": {"src_tokens": tokens}, "target": padded, "ntokens": int(padded.ne(d.pad()).sum())}
    loss, sample_size, log = crit(model, sample)
    logits = model(tokens)[0]
    want = F.cross_entropy(logits[0], target[0], reduction="sum") + \
        F.cross_entropy(logits[1, :6], target[1, :6], reduction="sum")
    assert sample_size == 16 and torch.allclose(loss, want, rtol=1e-5)
    with metrics.aggregate(new_root=True) as agg:
        adapter.TransNormerCrossEntropy.reduce_metrics([log])
        values = agg.get_smoothed_values()
    assert values["loss"] == pytest.approx(want.item() / 16 / math.log(2), abs=1e-3)
    assert values["ppl"] == pytest.approx(2 ** values["loss"], rel=1e-2)


def test_real_mismatched_checkpoint_names_the_tensor(real):
    _, _, task = real
    model = real_build(task)
    sd = model.state_dict()
    key = "decoder.transnormer.layers.1.channel_mixer.l1.weight"
    sd[key] = torch.zeros(3, 64)
    with pytest.raises(ValueError, match=re.escape(f"{key}: checkpoint (3, 64) vs model (128, 64)")):
        model.load_state_dict(sd)


@torch.no_grad()
def test_real_sequence_generator_greedy_matches_full_forward(real):
    # metaseq's own generator: prefill through the model, then the whole prefix to the decoder each step
    _, d, task = real
    from metaseq.sequence_generator import SequenceGenerator
    model = real_build(task)
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
