"""What the fairseq and Metaseq adapters share, with no host import: the model's command-line arguments and
their defaults, the preset architectures, the config built from parsed arguments, building the model with the
host's parallelism (tensor parallelism, FSDP units, activation checkpointing), the incremental decoder's methods,
and the criterion's loss and logged metrics. Each adapter adds only its host's base classes, registries and FSDP
wrapper (fairseq_adapter.py, metaseq_adapter.py)."""
import math
from typing import Callable

import torch.nn.functional as F
from torch import nn

from .model import DECAY_SCHEDULES, NORMS, QK_ACTIVATIONS, TransNormerConfig, TransNormerLLM

NO_POSITION_LIMIT = 1_000_000_000   # linear attention has none; --tokens-per-sample governs


def add_model_args(parser):
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
    parser.add_argument("--keep-linear-inputs", action="store_true",
                        help="keep the linear layers' inputs for backward instead of recomputing the norms, output "
                             "gate and SGLU product there: faster, more memory (385M at 16384 tokens on one H200: "
                             "4-25%% faster, 5-7 GB more; benchmarks/RESULTS.md)")


def base_architecture(args):
    """Defaults for every argument the user left unset (the 385M shape, released choices)."""
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


def preset_architecture(shape):
    """The architecture function of one preset: its shape unless the user set a value, then the defaults."""
    def arch(args):
        for key, field in (("decoder_embed_dim", "d_model"), ("decoder_layers", "n_layers"),
                           ("decoder_attention_heads", "n_heads"), ("hidden_dim", "hidden_dim"),
                           ("glu_dim", "glu_dim")):
            setattr(args, key, getattr(args, key, None) or shape[field])
        base_architecture(args)
    return arch


def config_from_args(args, dictionary) -> TransNormerConfig:
    return TransNormerConfig(
        vocab_size=len(dictionary), d_model=args.decoder_embed_dim, n_layers=args.decoder_layers,
        n_heads=args.decoder_attention_heads, hidden_dim=args.hidden_dim or None, glu_dim=args.glu_dim,
        lrpe_layers=tuple(int(i) for i in str(args.lrpe_layers).split(",") if i.strip() != ""),
        decay=args.decay_schedule, qk_act=args.qk_act, norm=args.norm_type, bias=args.bias,
        no_scale_embedding=args.no_scale_embedding, dropout=args.dropout, init_std=args.init_std,
        pad_id=dictionary.pad(), bos_id=dictionary.bos(), eos_id=dictionary.eos())


def build_transnormer(args, dictionary, fsdp_wrap: Callable[..., nn.Module]) -> TransNormerLLM:
    """The model for parsed host arguments. ``fsdp_wrap`` is the host's (fairseq's or Metaseq's): inside the
    host's FSDP context it makes each block an FSDP unit, elsewhere it returns the block as it is. With
    --model-parallel-size N each rank builds only its shard (over fairscale's model-parallel group, which the
    host has initialised); otherwise the blocks are made one at a time, each wrapped (and so sharded under FSDP)
    before the next exists. --checkpoint-activations recomputes each block inside its FSDP unit;
    --keep-linear-inputs turns the blocks' recomputed linear inputs off (recompute.keep_linear_inputs)."""
    from .parallel import build_block_by_block, build_tensor_parallel, checkpoint_block, wrap_blocks
    from .recompute import keep_linear_inputs
    base_architecture(args)
    cfg = config_from_args(args, dictionary)
    checkpointing = getattr(args, "checkpoint_activations", False)
    keep = getattr(args, "keep_linear_inputs", False)

    def prepare_block(block):
        block = keep_linear_inputs(block, keep)
        return fsdp_wrap(checkpoint_block(block) if checkpointing else block, min_num_params=0)

    if (getattr(args, "model_parallel_size", None) or 1) > 1:
        return wrap_blocks(build_tensor_parallel(cfg), prepare_block)
    return build_block_by_block(cfg, prepare_block)


def full_vocabulary_logits(transnormer: TransNormerLLM, logits):
    """Logits over the whole vocabulary: a vocab-parallel LM head gives each rank only its shard, which
    generation and scoring need gathered. Logits that are whole already are returned as they are, so both the
    incremental decoder and the hosts' get_normalized_probs can call this."""
    if getattr(transnormer, "vocab_parallel", False) and logits.size(-1) < transnormer.cfg.vocab_size:
        from .parallel import gather_vocab_parallel_logits
        return gather_vocab_parallel_logits(logits)
    return logits


class IncrementalDecoding:
    """Decoder methods over ``self.transnormer`` and the host's incremental_state helpers (both hosts' decoder
    bases provide get/set_incremental_state). With an incremental_state only the tokens not yet seen are
    consumed: the first call prefills the prompt with the block form, each later call is one recurrence step.
    The DecodeState (each layer's fp32 state and the position offset) lives under the key "decode". Logits
    while decoding are over the whole vocabulary also under tensor parallelism: the hosts' generators mask and
    pick tokens by id on them."""

    def decode(self, prev_output_tokens, incremental_state=None, features_only=False):
        if incremental_state is None:
            out, _ = self.transnormer(prev_output_tokens, return_hidden=features_only)
            return out, {"attn": [None], "inner_states": None}
        state = self.get_incremental_state(incremental_state, "decode")
        offset = 0 if state is None else state.offset
        out, state = self.transnormer(prev_output_tokens[:, offset:], state, use_cache=True,
                                      return_hidden=features_only)
        self.set_incremental_state(incremental_state, "decode", state)
        if not features_only:
            out = full_vocabulary_logits(self.transnormer, out)
        return out, {"attn": [None], "inner_states": None}

    def lm_loss(self, prev_output_tokens, target, padding_idx, reduce=True):
        """The criterion's loss (see criterion_loss), inside the decoder's forward: hidden states, then the LM head
        and cross entropy chunk by chunk, so that the [tokens, vocab] logits never exist. With a FiniteCheck
        installed (fairseq's --check-finite) the logits are made whole, as its check of the logits needs them."""
        if getattr(self, "finite_check", None) is not None:
            logits, _ = self.transnormer(prev_output_tokens)
            return token_cross_entropy(logits, target, padding_idx, reduce)
        hidden, _ = self.transnormer(prev_output_tokens, return_hidden=True)
        loss = self.transnormer.chunked_lm_loss(hidden, target, padding_idx, "sum" if reduce else "none")
        return loss if reduce else loss.reshape(-1)     # per token, flat like token_cross_entropy

    def reorder_incremental_state(self, incremental_state, new_order):
        state = self.get_incremental_state(incremental_state, "decode")
        if state is not None:
            self.set_incremental_state(incremental_state, "decode", state.index_select(new_order))

    def max_positions(self):
        return NO_POSITION_LIMIT


def token_cross_entropy(logits, target, padding_idx, reduce=True):
    """Cross entropy in fp32 over non-padding targets: summed, or per token (padding 0) without reduce."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                           ignore_index=padding_idx, reduction="sum" if reduce else "none")


def model_cross_entropy(model, logits, target, padding_idx, reduce=True):
    """token_cross_entropy of the model's logits, also when they are a vocab-parallel shard (each rank then holds
    part of the vocabulary, and the softmax is computed across the model-parallel group)."""
    if getattr(model, "vocab_parallel", False):
        from .parallel import vocab_parallel_cross_entropy
        loss = vocab_parallel_cross_entropy(logits, target, padding_idx, "sum" if reduce else "none")
        return loss if reduce else loss.reshape(-1)     # per token, flat like token_cross_entropy
    return token_cross_entropy(logits, target, padding_idx, reduce)


def criterion_loss(model, net_input, target, padding_idx, reduce=True):
    """The criterion's loss for a batch: cross entropy summed over non-padding targets, or per token (flat,
    padding 0) without reduce. The model computes it in its own forward (``loss_target=``: under its autocast and,
    under FSDP, while its LM head's weight is gathered) with the chunked LM head + loss, which never makes the
    [tokens, vocab] logits. A vocab-parallel model returns its logits shard instead, for
    vocab_parallel_cross_entropy (model_cross_entropy); so does a model whose decoder is not ours (a baseline
    registered beside the plugin that uses this criterion): it would ignore ``loss_target`` and return logits."""
    if getattr(model, "vocab_parallel", False) or not hasattr(getattr(model, "decoder", None), "lm_loss"):
        return model_cross_entropy(model, model(**net_input)[0], target, padding_idx, reduce)
    return model(**net_input, loss_target=target, loss_padding_idx=padding_idx, loss_reduce=reduce)[0]


def criterion_result(loss, sample):
    """What a host criterion returns: (loss, sample size in target tokens, the logging output)."""
    ntokens = sample["ntokens"]
    logging_output = {"loss": loss.data, "ntokens": ntokens, "nsentences": sample["target"].size(0),
                      "sample_size": ntokens}
    return loss, ntokens, logging_output


def log_loss_and_perplexity(metrics, get_perplexity, logging_outputs):
    """The criterion's reduce_metrics with the host's metrics module: loss per token in base 2, and ppl."""
    loss = sum(log.get("loss", 0) for log in logging_outputs)
    sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
    metrics.log_scalar("loss", loss / sample_size / math.log(2), sample_size, round=3)
    metrics.log_derived("ppl", lambda meters: get_perplexity(meters["loss"].avg))
