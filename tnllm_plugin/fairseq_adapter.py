"""fairseq adapter: registers model ``transnormer_llm``, its architecture presets and the criterion
``transnormer_llm_cross_entropy``. Thin: the model is tnllm_plugin.model.TransNormerLLM, unchanged."""
import argparse
from dataclasses import dataclass

import torch
from fairseq import metrics, utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.models import (FairseqIncrementalDecoder, FairseqLanguageModel, register_model,
                            register_model_architecture)
from fairseq.optim import register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig

from .checkpoint import check_state_dict
from .host_common import (IncrementalDecoding, add_model_args, build_transnormer, criterion_loss, criterion_result,
                          full_vocabulary_logits, log_loss_and_perplexity, preset_architecture)
from .model import TransNormerLLM
from .presets import PRESETS


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

# checkpoint_last.pt copied to a temporary name and renamed (a kill during the copy truncated it), and checkpoints
# fairseq cannot read named in the error (see fairseq_checkpoints)
from .fairseq_checkpoints import install as install_checkpoint_safety  # noqa: E402
install_checkpoint_safety()


class TransNormerDecoder(IncrementalDecoding, FairseqIncrementalDecoder):
    """fairseq's decoder interface around TransNormerLLM (incremental decoding: host_common.IncrementalDecoding)."""

    def __init__(self, transnormer: TransNormerLLM, dictionary, bf16_autocast: bool = False):
        super().__init__(dictionary)
        self.transnormer = transnormer
        self.bf16_autocast = bf16_autocast

    def forward(self, prev_output_tokens, **kwargs):
        # bf16 matmuls over fp32 weights (fairseq's optimizer then keeps fp32 weights and states by itself);
        # the attention states stay fp32 inside the kernels either way
        enabled = self.bf16_autocast and prev_output_tokens.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            return self._forward(prev_output_tokens, **kwargs)

    def _forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, features_only=False,
                 loss_target=None, loss_padding_idx=None, loss_reduce=True, **unused):
        if loss_target is not None:     # the criterion's loss in place of logits (host_common.criterion_loss)
            return self.lm_loss(prev_output_tokens, loss_target, loss_padding_idx, loss_reduce), {}
        return self.decode(prev_output_tokens, incremental_state, features_only)

    def upgrade_state_dict_named(self, state_dict, name):
        return state_dict

    def set_num_updates(self, num_updates):
        # the trainer's update count, which --check-finite names when a NaN or inf appears
        if getattr(self, "finite_check", None) is not None:
            self.finite_check.update = num_updates


@register_model("transnormer_llm")
class TransNormerLanguageModel(FairseqLanguageModel):
    @staticmethod
    def add_args(parser):
        add_model_args(parser)
        parser.add_argument("--bf16-autocast", action="store_true",
                            help="bf16 mixed precision on CUDA: fp32 weights and optimizer, bf16 matmuls "
                                 "(torch.autocast), fp32 attention states; fairseq 0.12's own --bf16 means TPU")
        parser.add_argument("--check-finite", action="store_true",
                            help="stop at the first NaN or inf in the embedding, an attention state or output, a "
                                 "block output or the logits, naming the update and the layer (tnllm_plugin.finite; "
                                 "one device sync per check)")

    @classmethod
    def build_model(cls, args, task):
        from fairseq.distributed import fsdp_wrap
        transnormer = build_transnormer(args, task.target_dictionary, fsdp_wrap)
        decoder = TransNormerDecoder(transnormer, task.target_dictionary,
                                     bf16_autocast=getattr(args, "bf16_autocast", False))
        if getattr(args, "check_finite", False):
            from .finite import FiniteCheck
            decoder.finite_check = FiniteCheck(transnormer)
        return cls(decoder)

    @property
    def vocab_parallel(self):
        return getattr(self.decoder.transnormer, "vocab_parallel", False)

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        # generation and scoring (SequenceGenerator, fairseq-eval-lm) normalise here: gather a vocab-parallel shard
        net_output = (full_vocabulary_logits(self.decoder.transnormer, net_output[0]), *net_output[1:])
        return super().get_normalized_probs(net_output, log_probs, sample)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        # the vocabulary is the task's dictionary: a checkpoint of another size means another (or a damaged) dict.txt
        rows = state_dict.get("decoder.transnormer.embed_tokens.weight")
        if rows is not None and rows.shape[0] != len(self.decoder.dictionary) and not self.vocab_parallel:
            raise ValueError(f"the checkpoint has {rows.shape[0]} vocabulary rows, the task's dictionary (dict.txt "
                             f"of the data directory) {len(self.decoder.dictionary)} entries")
        # name every missing or mis-shaped tensor before torch's own (terser) check
        check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)


for _name, _shape in PRESETS.items():
    register_model_architecture("transnormer_llm", f"transnormer_llm_{_name}")(preset_architecture(_shape))


@register_criterion("transnormer_llm_cross_entropy")
class TransNormerCrossEntropy(FairseqCriterion):
    """Token-level cross entropy summed over non-padding targets (per token, padding 0, with reduce=False), from
    the model's chunked LM head + loss (vocab-parallel under tensor parallelism); logs loss (base 2) and
    perplexity."""

    def forward(self, model, sample, reduce=True):
        target = model.get_targets(sample, None)
        return criterion_result(criterion_loss(model, sample["net_input"], target, self.padding_idx, reduce), sample)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        log_loss_and_perplexity(metrics, utils.get_perplexity, logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


@dataclass
class TorchAdamWConfig(FairseqAdamConfig):
    pass


@register_optimizer("torch_adamw", dataclass=TorchAdamWConfig)
class TorchAdamW(FairseqAdam):
    """``--optimizer torch_adamw``: fairseq's adam options (--adam-betas, --adam-eps, --weight-decay: decoupled, as
    fairseq's adam) on torch.optim.AdamW, fused on CUDA, foreach on the CPU (fairseq's own adam without apex is a
    Python loop over parameters). The Metaseq adapter registers the same optimizer for Metaseq."""

    def __init__(self, cfg, params):
        super(FairseqAdam, self).__init__(cfg)        # FairseqOptimizer's init: FairseqAdam's picks its own class
        params = list(params)
        fused = bool(params) and all(p.is_cuda for p in params)
        self._optimizer = torch.optim.AdamW(params, fused=fused, foreach=not fused, **self.optimizer_config)
