"""fairseq adapter: registers model ``transnormer_llm``, its architecture presets and the criterion
``transnormer_llm_cross_entropy``. Thin: the model is tnllm_plugin.model.TransNormerLLM, unchanged."""
import argparse
import math

import torch
import torch.nn.functional as F
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.models import (FairseqIncrementalDecoder, FairseqLanguageModel, register_model,
                            register_model_architecture)

from .checkpoint import check_state_dict
from .model import DECAY_SCHEDULES, NORMS, QK_ACTIVATIONS, TransNormerConfig, TransNormerLLM
from .presets import PRESETS

NO_POSITION_LIMIT = 1_000_000_000   # linear attention has none; --tokens-per-sample governs


def allow_fairseq_checkpoints_in_torch_load():
    """torch >= 2.6 loads with weights_only=True, which refuses the argparse / omegaconf / meter objects that
    fairseq stores in its checkpoints. Allow-list exactly those types, so fairseq-eval-lm, fairseq-generate and
    resuming work with the default torch.load and no environment variable."""
    import collections
    import typing

    from fairseq import meters
    from omegaconf import DictConfig, ListConfig
    from omegaconf.base import ContainerMetadata, Metadata
    from omegaconf.nodes import AnyNode
    safe = [argparse.Namespace, DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any,
            collections.defaultdict, dict, list, int, float, str, bool,
            meters.AverageMeter, meters.TimeMeter, meters.StopwatchMeter, meters.MetersDict]
    torch.serialization.add_safe_globals(safe)


allow_fairseq_checkpoints_in_torch_load()

# fairseq's --model-parallel-size imports Megatron's mpu, a submodule the pip package lacks: map it to fairscale's
# (done at import, before fairseq-train's distributed init; see parallel.install_megatron_mpu_shim)
from .parallel import install_megatron_mpu_shim  # noqa: E402
install_megatron_mpu_shim()


def config_from_args(args, dictionary) -> TransNormerConfig:
    return TransNormerConfig(
        vocab_size=len(dictionary), d_model=args.decoder_embed_dim, n_layers=args.decoder_layers,
        n_heads=args.decoder_attention_heads, hidden_dim=args.hidden_dim or None, glu_dim=args.glu_dim,
        lrpe_layers=tuple(int(i) for i in str(args.lrpe_layers).split(",") if i.strip() != ""),
        decay=args.decay_schedule, qk_act=args.qk_act, norm=args.norm_type, bias=args.bias,
        no_scale_embedding=args.no_scale_embedding, dropout=args.dropout, init_std=args.init_std,
        pad_id=dictionary.pad(), bos_id=dictionary.bos(), eos_id=dictionary.eos())


class TransNormerDecoder(FairseqIncrementalDecoder):
    """fairseq's decoder interface around TransNormerLLM. With an ``incremental_state`` it consumes only the
    tokens it has not seen: the first call prefills the prompt with the block form, every later call is one
    recurrence step. The state (each layer's fp32 state and the position offset) lives in incremental_state."""

    def __init__(self, cfg: TransNormerConfig, dictionary, bf16_autocast: bool = False):
        super().__init__(dictionary)
        self.transnormer = TransNormerLLM(cfg)
        self.bf16_autocast = bf16_autocast

    def forward(self, prev_output_tokens, **kwargs):
        # bf16 matmuls over fp32 weights (fairseq's optimizer then keeps fp32 weights and states by itself);
        # the attention states stay fp32 inside the kernels either way
        enabled = self.bf16_autocast and prev_output_tokens.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            return self._forward(prev_output_tokens, **kwargs)

    def _forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False,
                 **unused):
        if incremental_state is None:
            out, _ = self.transnormer(prev_output_tokens, return_hidden=features_only)
            return out, {"attn": [None], "inner_states": None}
        state = self.get_incremental_state(incremental_state, "decode")
        offset = 0 if state is None else state.offset
        out, state = self.transnormer(prev_output_tokens[:, offset:], state, use_cache=True,
                                      return_hidden=features_only)
        self.set_incremental_state(incremental_state, "decode", state)
        return out, {"attn": [None], "inner_states": None}

    def reorder_incremental_state(self, incremental_state, new_order):
        state = self.get_incremental_state(incremental_state, "decode")
        if state is not None:
            self.set_incremental_state(incremental_state, "decode", state.index_select(new_order))

    def max_positions(self):
        return NO_POSITION_LIMIT

    def upgrade_state_dict_named(self, state_dict, name):
        return state_dict


@register_model("transnormer_llm")
class TransNormerLanguageModel(FairseqLanguageModel):
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
        parser.add_argument("--bf16-autocast", action="store_true",
                            help="bf16 mixed precision on CUDA: fp32 weights and optimizer, bf16 matmuls "
                                 "(torch.autocast), fp32 attention states; fairseq 0.12's own --bf16 means TPU")

    @classmethod
    def build_model(cls, args, task):
        base_architecture(args)
        decoder = TransNormerDecoder(config_from_args(args, task.target_dictionary), task.target_dictionary,
                                     bf16_autocast=getattr(args, "bf16_autocast", False))
        if getattr(args, "model_parallel_size", 1) > 1:
            from .parallel import apply_tensor_parallel
            apply_tensor_parallel(decoder.transnormer)
        from .parallel import apply_activation_checkpointing, apply_fsdp
        if getattr(args, "checkpoint_activations", False):
            apply_activation_checkpointing(decoder.transnormer)
        apply_fsdp(decoder.transnormer)     # one FSDP unit per block under --ddp-backend fully_sharded, else no-op
        return cls(decoder)

    @property
    def vocab_parallel(self):
        return getattr(self.decoder.transnormer, "vocab_parallel", False)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        # name every missing or mis-shaped tensor before torch's own (terser) check
        check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


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
        args.decoder_embed_dim = getattr(args, "decoder_embed_dim", None) or shape["d_model"]
        args.decoder_layers = getattr(args, "decoder_layers", None) or shape["n_layers"]
        args.decoder_attention_heads = getattr(args, "decoder_attention_heads", None) or shape["n_heads"]
        args.hidden_dim = getattr(args, "hidden_dim", None) or shape["hidden_dim"]
        args.glu_dim = getattr(args, "glu_dim", None) or shape["glu_dim"]
        base_architecture(args)
    register_model_architecture("transnormer_llm", f"transnormer_llm_{name}")(arch)


for _name, _shape in PRESETS.items():
    _register_preset(_name, _shape)


@register_criterion("transnormer_llm_cross_entropy")
class TransNormerCrossEntropy(FairseqCriterion):
    """Token-level cross entropy summed over non-padding targets; logs loss (base 2) and perplexity."""

    def forward(self, model, sample, reduce=True):
        logits = model(**sample["net_input"])[0]
        target = model.get_targets(sample, [logits])
        if getattr(model, "vocab_parallel", False):
            from .parallel import vocab_parallel_cross_entropy
            loss = vocab_parallel_cross_entropy(logits, target, self.padding_idx)
        else:
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
