"""Metaseq adapter: registers model ``transnormer_llm``, its architecture presets and the criterion
``transnormer_llm_cross_entropy``. Thin: the model is tnllm_plugin.model.TransNormerLLM, unchanged.

Same arguments, presets and defaults as fairseq_adapter.py (written again here so that Metaseq never imports
fairseq). Metaseq's tensor parallelism is its own Megatron copy, not the fairscale one that
tnllm_plugin.parallel shards with, so ``--model-parallel-size > 1`` is refused rather than run wrongly.
"""
import math

import torch.nn.functional as F
from metaseq import utils
from metaseq.criterions import BaseCriterion, register_criterion
from metaseq.logging import metrics
from metaseq.models import BaseDecoder, BaseModel, register_model, register_model_architecture

from .checkpoint import check_state_dict
from .model import DECAY_SCHEDULES, NORMS, QK_ACTIVATIONS, TransNormerConfig, TransNormerLLM
from .presets import PRESETS

NO_POSITION_LIMIT = 1_000_000_000   # linear attention has none; --tokens-per-sample governs


def config_from_args(args, dictionary) -> TransNormerConfig:
    return TransNormerConfig(
        vocab_size=len(dictionary), d_model=args.decoder_embed_dim, n_layers=args.decoder_layers,
        n_heads=args.decoder_attention_heads, hidden_dim=args.hidden_dim or None, glu_dim=args.glu_dim,
        lrpe_layers=tuple(int(i) for i in str(args.lrpe_layers).split(",") if i.strip() != ""),
        decay=args.decay_schedule, qk_act=args.qk_act, norm=args.norm_type, bias=args.bias,
        no_scale_embedding=args.no_scale_embedding, dropout=args.dropout, init_std=args.init_std,
        pad_id=dictionary.pad(), bos_id=dictionary.bos(), eos_id=dictionary.eos())


class TransNormerDecoder(BaseDecoder):
    """Metaseq's incremental-decoder interface around TransNormerLLM. Metaseq's generator prefills with the
    prompt and then passes the whole prefix each step; with an ``incremental_state`` only the tokens not yet
    seen are consumed (block form for the prompt, one recurrence step after). The DecodeState (each layer's
    fp32 state and the position offset) is kept in incremental_state under "decode"."""

    def __init__(self, cfg: TransNormerConfig, dictionary):
        super().__init__(dictionary)
        self.transnormer = TransNormerLLM(cfg)

    def forward(self, prev_output_tokens, incremental_state=None, features_only=False, **unused):
        if incremental_state is None:
            out, _ = self.transnormer(prev_output_tokens, return_hidden=features_only)
            return out, {"attn": [None], "inner_states": None}
        state = self.get_incremental_state(incremental_state, "decode")
        offset = 0 if state is None else state.offset
        out, state = self.transnormer(prev_output_tokens[:, offset:], state, use_cache=True,
                                      return_hidden=features_only)
        self.set_incremental_state(incremental_state, "decode", state)
        return out, {"attn": [None], "inner_states": None}

    def extract_features(self, prev_output_tokens, incremental_state=None, **kwargs):
        return self.forward(prev_output_tokens, incremental_state, features_only=True)

    def output_layer(self, features, **kwargs):
        return self.transnormer.lm_head(features)

    def reorder_incremental_state(self, incremental_state, new_order):
        state = self.get_incremental_state(incremental_state, "decode")
        if state is not None:
            self.set_incremental_state(incremental_state, "decode", state.index_select(new_order))

    # metaseq's EnsembleModel calls this name, which its BaseDecoder does not define
    reorder_incremental_state_scripting = reorder_incremental_state

    def max_positions(self):
        return NO_POSITION_LIMIT


@register_model("transnormer_llm")
class TransNormerLanguageModel(BaseModel):
    @staticmethod
    def add_args(parser):
        parser.add_argument("--decoder-embed-dim", type=int, help="d_model")
        parser.add_argument("--decoder-layers", type=int)
        parser.add_argument("--decoder-attention-heads", type=int)
        parser.add_argument("--hidden-dim", type=int, help="GLA width (default: d_model)")
        parser.add_argument("--glu-dim", type=int, help="SGLU inner width")
        parser.add_argument("--lrpe-layers", type=str, help="comma list of layers using LRPE-d (default: 0)")
        parser.add_argument("--decay-schedule", choices=DECAY_SCHEDULES)
        parser.add_argument("--qk-act", choices=QK_ACTIVATIONS)
        parser.add_argument("--norm-type", choices=NORMS)
        parser.add_argument("--bias", action="store_true", help="biases in the linear layers")
        parser.add_argument("--no-scale-embedding", action="store_true")
        parser.add_argument("--dropout", type=float, metavar="D")
        parser.add_argument("--init-std", type=float)
        parser.add_argument("--checkpoint-activations", action="store_true",
                            help="recompute each block's activations in the backward pass")

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        if (getattr(args, "model_parallel_size", None) or 1) > 1:
            raise ValueError("transnormer_llm under Metaseq runs with --model-parallel-size 1 only (its tensor "
                             "parallelism is fairscale's, used through the fairseq adapter)")
        decoder = TransNormerDecoder(config_from_args(args, task.target_dictionary), task.target_dictionary)
        if getattr(args, "checkpoint_activations", False):
            from .parallel import apply_activation_checkpointing
            apply_activation_checkpointing(decoder.transnormer)
        return cls(decoder)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        # name every missing or mis-shaped tensor before torch's own (terser) check; strict=False is what
        # metaseq's EMA restore uses, and torch still refuses a mis-shaped tensor there
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, **kwargs)


def base_architecture(args):
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", None) or 1024
    args.decoder_layers = getattr(args, "decoder_layers", None) or 24
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", None) or 8
    args.hidden_dim = getattr(args, "hidden_dim", None) or args.decoder_embed_dim
    args.glu_dim = getattr(args, "glu_dim", None) or 2816
    args.lrpe_layers = getattr(args, "lrpe_layers", None) or "0"
    args.decay_schedule = getattr(args, "decay_schedule", None) or "released"
    args.qk_act = getattr(args, "qk_act", None) or "silu"
    args.norm_type = getattr(args, "norm_type", None) or "srms"
    args.bias = getattr(args, "bias", False)
    args.no_scale_embedding = getattr(args, "no_scale_embedding", False)
    args.dropout = getattr(args, "dropout", None) or 0.0
    args.init_std = getattr(args, "init_std", None) or 0.02


def _register_preset(name, shape):
    def arch(args):
        for key, field in (("decoder_embed_dim", "d_model"), ("decoder_layers", "n_layers"),
                           ("decoder_attention_heads", "n_heads"), ("hidden_dim", "hidden_dim"),
                           ("glu_dim", "glu_dim")):
            setattr(args, key, getattr(args, key, None) or shape[field])
        base_architecture(args)
    register_model_architecture("transnormer_llm", f"transnormer_llm_{name}")(arch)


for _name, _shape in PRESETS.items():
    _register_preset(_name, _shape)


@register_criterion("transnormer_llm_cross_entropy")
class TransNormerCrossEntropy(BaseCriterion):
    """Token-level cross entropy summed over non-padding targets; logs loss (base 2) and perplexity."""

    def forward(self, model, sample, reduce=True):
        logits = model(**sample["net_input"])[0]
        target = model.get_targets(sample)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                               ignore_index=self.padding_idx, reduction="sum" if reduce else "none")
        ntokens = sample["ntokens"]
        logging_output = {"loss": loss.data, "ntokens": ntokens, "nsentences": sample["target"].size(0),
                          "sample_size": ntokens}
        return loss, ntokens, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss = sum(log.get("loss", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        metrics.log_scalar("loss", loss / sample_size / math.log(2), sample_size, round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
