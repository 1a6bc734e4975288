"""Metaseq adapter: registers model ``transnormer_llm``, its architecture presets and the criterion
``transnormer_llm_cross_entropy``. Thin: the model is tnllm_plugin.model.TransNormerLLM, unchanged.

Arguments, presets, defaults, incremental decoding and the loss are shared with fairseq_adapter.py through
host_common.py (which imports neither host). Metaseq's tensor parallelism is its own Megatron copy, not the
fairscale one that tnllm_plugin.parallel shards with, so ``--model-parallel-size > 1`` is refused rather than
run wrongly.
"""
from metaseq import utils
from metaseq.criterions import BaseCriterion, register_criterion
from metaseq.logging import metrics
from metaseq.models import BaseDecoder, BaseModel, register_model, register_model_architecture

from .checkpoint import check_state_dict
from .host_common import (IncrementalDecoding, add_model_args, base_architecture, config_from_args,
                          criterion_result, log_loss_and_perplexity, preset_architecture, token_cross_entropy)
from .model import TransNormerConfig, TransNormerLLM
from .presets import PRESETS


class TransNormerDecoder(IncrementalDecoding, BaseDecoder):
    """Metaseq's incremental-decoder interface around TransNormerLLM. Metaseq's generator prefills with the
    prompt and then passes the whole prefix each step; with an ``incremental_state`` only the tokens not yet
    seen are consumed (block form for the prompt, one recurrence step after). The DecodeState (each layer's
    fp32 state and the position offset) is kept in incremental_state under "decode"."""

    def __init__(self, cfg: TransNormerConfig, dictionary):
        super().__init__(dictionary)
        self.transnormer = TransNormerLLM(cfg)

    def forward(self, prev_output_tokens, incremental_state=None, features_only=False, **unused):
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


for _name, _shape in PRESETS.items():
    register_model_architecture("transnormer_llm", f"transnormer_llm_{_name}")(preset_architecture(_shape))


@register_criterion("transnormer_llm_cross_entropy")
class TransNormerCrossEntropy(BaseCriterion):
    """Token-level cross entropy summed over non-padding targets; logs loss (base 2) and perplexity."""

    def forward(self, model, sample, reduce=True):
        logits = model(**sample["net_input"])[0]
        target = model.get_targets(sample)
        loss = token_cross_entropy(logits, target, self.padding_idx, reduce)
        return criterion_result(loss, sample)

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        log_loss_and_perplexity(metrics, utils.get_perplexity, logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
