"""Metaseq adapter: registers model ``transnormer_llm``, its architecture presets and the criterion
``transnormer_llm_cross_entropy``. Thin: the model is tnllm_plugin.model.TransNormerLLM, unchanged.

Arguments, presets, defaults, building (tensor parallelism, FSDP units, activation checkpointing), incremental
decoding and the loss are shared with fairseq_adapter.py through host_common.py (which imports neither host).

Tensor parallelism uses fairscale's model-parallel layers, as under fairseq, on a fairscale group made of the
same ranks as Metaseq's own tensor-parallel group (Metaseq's Megatron layers assume CUDA and its
transformer's layout; fairscale's run on CPU processes too, so MP2/MP4 are tested on CPU against MP1). FSDP is
Metaseq's (fairscale's FullyShardedDataParallel through ``metaseq.distributed.fsdp_wrap``), one unit per block.
"""
import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist
from metaseq import utils
from metaseq.criterions import BaseCriterion, register_criterion
from metaseq.distributed import fsdp_wrap
from metaseq.distributed import utils as distributed_utils
from metaseq.logging import meters, metrics
from metaseq.models import BaseDecoder, BaseModel, register_model, register_model_architecture
from metaseq.optim import BaseOptimizer, register_optimizer
from metaseq.optim.adam import MetaseqAdam, MetaseqAdamConfig

from .checkpoint import check_state_dict
from .host_common import (IncrementalDecoding, add_model_args, build_transnormer, criterion_loss, criterion_result,
                          full_vocabulary_logits, log_loss_and_perplexity, preset_architecture)
from .model import TransNormerLLM
from .presets import PRESETS


def allow_metaseq_checkpoints_in_torch_load():
    """torch >= 2.6 loads with weights_only=True, which refuses the objects Metaseq pickles into its checkpoints
    (the model's argparse arguments, the streaming data iterator's position, meters). Allow-list exactly those
    types, so metaseq-validate, generation and resuming load the plugin's checkpoints with the default
    torch.load."""
    from metaseq.data.document_to_sequence import LockingArray
    torch.serialization.add_safe_globals([argparse.Namespace, LockingArray, meters.AverageMeter, meters.TimeMeter,
                                          meters.StopwatchMeter, meters.MetersDict])


allow_metaseq_checkpoints_in_torch_load()


def use_metaseq_model_parallel_group():
    """Initialise fairscale's model-parallel state (which tnllm_plugin.parallel shards with) with the ranks of
    Metaseq's tensor-parallel group, and check that both name the same ranks."""
    from fairscale.nn.model_parallel import initialize as fairscale_mp
    size = distributed_utils.get_model_parallel_world_size()
    if not fairscale_mp.model_parallel_is_initialized():
        fairscale_mp.initialize_model_parallel(size)
    ours = dist.get_process_group_ranks(fairscale_mp.get_model_parallel_group())
    theirs = dist.get_process_group_ranks(distributed_utils.get_model_parallel_group())
    if ours != theirs:
        raise RuntimeError(f"fairscale's model-parallel group {ours} differs from Metaseq's {theirs}")


class TransNormerDecoder(IncrementalDecoding, BaseDecoder):
    """Metaseq's incremental-decoder interface around TransNormerLLM (host_common.IncrementalDecoding).
    Metaseq's generator prefills with the prompt and then passes the whole prefix each step; with an
    ``incremental_state`` only the tokens not yet seen are consumed."""

    def __init__(self, transnormer: TransNormerLLM, dictionary):
        super().__init__(dictionary)
        self.transnormer = transnormer

    def forward(self, prev_output_tokens, incremental_state=None, features_only=False, loss_target=None,
                loss_padding_idx=None, loss_reduce=True, **unused):
        if loss_target is not None:     # the criterion's loss in place of logits (host_common.criterion_loss)
            return self.lm_loss(prev_output_tokens, loss_target, loss_padding_idx, loss_reduce), {}
        return self.decode(prev_output_tokens, incremental_state, features_only)

    def extract_features(self, prev_output_tokens, incremental_state=None, **kwargs):
        return self.forward(prev_output_tokens, incremental_state, features_only=True)

    def output_layer(self, features, **kwargs):
        return self.transnormer.lm_head(features)

    # metaseq's EnsembleModel calls this name, which its BaseDecoder does not define
    def reorder_incremental_state_scripting(self, incremental_state, new_order):
        return self.reorder_incremental_state(incremental_state, new_order)


@register_model("transnormer_llm")
class TransNormerLanguageModel(BaseModel):
    @staticmethod
    def add_args(parser):
        add_model_args(parser)

    @classmethod
    def build_model(cls, args, task):
        if (getattr(args, "model_parallel_size", None) or 1) > 1:
            use_metaseq_model_parallel_group()
        transnormer = build_transnormer(args, task.target_dictionary, fsdp_wrap)
        return cls(TransNormerDecoder(transnormer, task.target_dictionary))

    @property
    def vocab_parallel(self):
        return getattr(self.decoder.transnormer, "vocab_parallel", False)

    def get_normalized_probs(self, net_output, log_probs, **kwargs):
        # Metaseq passes logits, or (logits, extra); a vocab-parallel shard is gathered first
        logits = net_output[0] if isinstance(net_output, tuple) else net_output
        return self.decoder.get_normalized_probs(full_vocabulary_logits(self.decoder.transnormer, logits), log_probs)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        # name every missing or mis-shaped tensor before torch's own (terser) check; strict=False is what
        # metaseq's EMA restore uses, and torch still refuses a mis-shaped tensor there
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, **kwargs)


for _name, _shape in PRESETS.items():
    register_model_architecture("transnormer_llm", f"transnormer_llm_{_name}")(preset_architecture(_shape))


@register_criterion("transnormer_llm_cross_entropy")
class TransNormerCrossEntropy(BaseCriterion):
    """Token-level cross entropy summed over non-padding targets, from the model's chunked LM head + loss
    (vocab-parallel under tensor parallelism); logs loss (base 2) and perplexity."""

    def forward(self, model, sample, reduce=True):
        target = model.get_targets(sample)
        return criterion_result(criterion_loss(model, sample["net_input"], target, self.padding_idx, reduce), sample)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        log_loss_and_perplexity(metrics, utils.get_perplexity, logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


@dataclass
class TorchAdamWConfig(MetaseqAdamConfig):
    pass


@register_optimizer("torch_adamw", dataclass=TorchAdamWConfig)
class TorchAdamW(BaseOptimizer):
    """``--optimizer torch_adamw``: Metaseq's ``adam`` options (betas, eps, weight decay; decoupled weight decay
    as its own) on torch.optim.AdamW, fused into one CUDA kernel per step (foreach on the CPU). Without apex,
    Metaseq's ``adam`` runs a Python loop of unfused element-wise ops, which cost 0.38 s per update of a 7B model
    on an H200 (benchmarks/RESULTS.md). torch puts eps after the bias correction, Metaseq's before it."""

    def __init__(self, cfg, params):
        super().__init__(cfg)
        params = list(params)
        fused = bool(params) and all(p.is_cuda for p in params)
        self._optimizer = torch.optim.AdamW(params, fused=fused, foreach=not fused, **self.optimizer_config)

    optimizer_config = MetaseqAdam.optimizer_config

    def step(self, closure=None, scale=1.0, groups=None):
        # FSDP's mixed precision leaves bf16 gradients on fp32 flat parameters (unless --fp32-reduce-scatter);
        # AdamW wants one dtype per parameter and gradient, as Metaseq's adam casts them too
        for p in self.params:
            if p.grad is not None and p.grad.dtype != p.dtype:
                p.grad = p.grad.to(p.dtype)
        super().step(closure, scale, groups)

    @property
    def supports_flat_params(self):     # FSDP's flat parameters are plain tensors to AdamW
        return True
