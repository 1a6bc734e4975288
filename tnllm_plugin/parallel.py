"""Scaling TransNormerLLM out, applied to the plain model from outside (paper section 3.2.2).

Tensor parallelism (Megatron style, with fairscale's model-parallel layers):
    GLA   fused QKVU column-parallel, each rank holding whole heads [q_r | k_r | v_r | u_r];
          the output SRMSNorm reduces its sum of squares over the group; W_o row-parallel
    SGLU  W1, W2 column-parallel, W3 row-parallel (one all-reduce forward, one backward)
    vocab embedding vocab-parallel; LM head column-parallel over the vocabulary, logits stay sharded and
          go to ``vocab_parallel_cross_entropy``
Parameter names do not change, so a sharded state dict has the unsharded keys with sliced tensors:
``shard_state_dict`` / ``consolidate_state_dict`` define the layout once, and ``apply_tensor_parallel`` is
"swap the modules, then load the rank's slice of the full weights". ``build_tensor_parallel`` does the same
from a model on the meta device, making only the rank's blocks of each initial value: no rank ever holds (or
draws) the whole model.

Also here: per-block activation checkpointing, building a model one block at a time so that each block can be
wrapped in its FSDP unit (fairseq's ``fsdp_wrap``) before the next exists, and the shim that lets fairseq 0.12's
``--model-parallel-size`` run on fairscale (``install_megatron_mpu_shim``).
"""
import argparse
import functools
import os
import re
import sys
import types
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from .model import GatedLinearAttention, SGLU, TransNormerConfig, TransNormerLLM, decay_slopes

# ---------------------------------------------------------------------------------------------------------
# The sharding layout, by parameter name (suffix match, so any host prefix such as "decoder." works).
# Each rule says how the full tensor splits over the group: along rows (dim 0), along columns (dim 1),
# "qkvu" (rows, by quarters: each rank takes its slice of each of Q, K, V and U), or not at all.

_LAYOUT = [
    (r"embed_tokens\.weight$", "rows"),
    (r"lm_head\.weight$", "rows"),
    (r"token_mixer\.qkvu_proj\.(weight|bias)$", "qkvu"),
    (r"token_mixer\.out_proj\.weight$", "cols"),
    (r"token_mixer\.lrpe\.theta$", "rows"),             # [H, 1, e]: heads
    (r"token_mixer\.out_norm\.(weight|bias)$", "rows"),  # over hidden_dim, in head order
    (r"channel_mixer\.l[12]\.(weight|bias)$", "rows"),
    (r"channel_mixer\.l3\.weight$", "cols"),
]


def _split_rule(name: str) -> str:
    for pattern, rule in _LAYOUT:
        if re.search(pattern, name):
            return rule
    return "replicated"     # norms over d_model, row-parallel biases (added after the all-reduce)


def _shard_blocks(shape, rule: str, rank: int, world_size: int, name: str) -> List[tuple]:
    """This rank's part of a tensor of ``shape`` split by ``rule``: index tuples (one slice per dimension) of the
    blocks to concatenate along dim 0 (one block; four for "qkvu", this rank's slice of each of Q, K, V and U)."""
    whole = tuple(slice(0, n) for n in shape)
    if rule == "replicated":
        return [whole]
    dim = 1 if rule == "cols" else 0
    parts = 4 if rule == "qkvu" else 1
    if shape[dim] % (parts * world_size):
        raise ValueError(f"{name}: dim {dim} of size {shape[dim]} does not split over {world_size} ranks")
    part, n = shape[dim] // parts, shape[dim] // (parts * world_size)
    return [whole[:dim] + (slice(q * part + rank * n, q * part + (rank + 1) * n),) + whole[dim + 1:]
            for q in range(parts)]


def _shard_tensor(t: torch.Tensor, rule: str, rank: int, world_size: int, name: str) -> torch.Tensor:
    if rule == "replicated":
        return t
    return torch.cat([t[idx] for idx in _shard_blocks(t.shape, rule, rank, world_size, name)])


def _cat_tensors(parts: List[torch.Tensor], rule: str) -> torch.Tensor:
    if rule == "replicated":
        return parts[0]
    if rule == "qkvu":
        quarters = [p.reshape(4, p.shape[0] // 4, *p.shape[1:]) for p in parts]
        return torch.cat(quarters, dim=1).reshape(-1, *parts[0].shape[1:])
    return torch.cat(parts, dim=1 if rule == "cols" else 0)


def shard_state_dict(full: Dict[str, torch.Tensor], rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    """The state dict of tensor-parallel rank ``rank`` of ``world_size``, from an unsharded one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a model-parallel group of {world_size}")
    if world_size == 1:
        return dict(full)
    if not any(_split_rule(k) == "qkvu" for k in full):
        raise ValueError("no TransNormerLLM attention weights (token_mixer.qkvu_proj) in this state dict")
    return {k: _shard_tensor(v, _split_rule(k), rank, world_size, k) for k, v in full.items()}


def consolidate_state_dict(shards: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The unsharded state dict from the state dicts of every tensor-parallel rank, in rank order."""
    if not shards:
        raise ValueError("no shards to consolidate")
    keys = list(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if list(s) != keys:
            raise ValueError(f"shard {r} has different parameter names than shard 0")
    return {k: _cat_tensors([s[k] for s in shards], _split_rule(k)) for k in keys}


def reshard_state_dicts(shards: List[Dict[str, torch.Tensor]], world_size: int) -> List[Dict[str, torch.Tensor]]:
    """Checkpoint shards written at one model-parallel size, re-split for another."""
    full = consolidate_state_dict(shards)
    return [shard_state_dict(full, r, world_size) for r in range(world_size)]


def _part_path(prefix: str, rank: int, world_size: int) -> str:
    """fairseq's file naming: checkpoint_last.pt at MP 1, checkpoint_last-model_part-{rank}.pt above."""
    stem = prefix[:-3] if prefix.endswith(".pt") else prefix
    return f"{stem}.pt" if world_size == 1 else f"{stem}-model_part-{rank}.pt"


def _record_model_parallel_size(state: dict, size: int, rank: int = 0):
    """Set the model-parallel size everywhere a fairseq or Metaseq checkpoint records it: the common and
    checkpoint config sections, and the model's own arguments (an argparse Namespace in cfg["model"], or "args"
    in older checkpoints), which build_model reads when fairseq-eval-lm, fairseq-generate or metaseq-validate
    load the file. The hosts' distributed init also appended the part's file suffix "-model_part-R" to
    cfg["checkpoint"]["checkpoint_suffix"]: it becomes this part's, or none at size 1."""
    cfg = state.get("cfg")
    sections = [cfg[name] for name in ("common", "checkpoint", "model") if cfg is not None and name in cfg]
    for section in sections + [state.get("args")]:
        if isinstance(section, argparse.Namespace):
            if hasattr(section, "model_parallel_size"):
                section.model_parallel_size = size
        elif section is not None and "model_parallel_size" in section:
            section["model_parallel_size"] = size
    checkpoint_cfg = cfg.get("checkpoint") if cfg is not None else None
    suffix = checkpoint_cfg.get("checkpoint_suffix") if checkpoint_cfg is not None else None
    if isinstance(suffix, str):
        base = re.sub(r"-model_part-\d+$", "", suffix)
        checkpoint_cfg["checkpoint_suffix"] = base if size == 1 else f"{base}-model_part-{rank}"


def reshard_checkpoint(prefix: str, from_size: int, to_size: int, out_prefix: str) -> List[str]:
    """Rewrite fairseq (or Metaseq, which names its parts the same way) checkpoint files written at
    model-parallel size ``from_size`` for ``to_size``: the model weights are consolidated and re-split; the rest
    of part 0 is kept, except the optimizer state, whose flattened per-rank layout cannot be re-split (resume
    with --reset-optimizer). The output folder is created if missing."""
    # weights_only=False: these are the user's own fairseq checkpoints (they pickle argparse/omegaconf objects)
    parts = [torch.load(_part_path(prefix, r, from_size), map_location="cpu", weights_only=False)
             for r in range(from_size)]
    shards = reshard_state_dicts([p["model"] for p in parts], to_size)
    written = []
    for rank, shard in enumerate(shards):
        state = {k: v for k, v in parts[0].items() if k != "last_optimizer_state"}
        state["model"] = shard
        _record_model_parallel_size(state, to_size, rank)
        path = _part_path(out_prefix, rank, to_size)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(state, path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------
# Collectives with the gradients they need

class _AllReduceSum(torch.autograd.Function):
    """Sum over the model-parallel group; every rank's input affects every rank's output, so the backward
    is a sum too (fairscale's reduce_from_model_parallel_region assumes replicated consumers instead)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ParallelOutNorm(nn.Module):
    """The GLA output norm over the whole hidden_dim when each rank holds hidden_dim / tp of it: the
    statistics (sum, sum of squares) are all-reduced, so every rank normalises exactly as one device would.
    Computed in fp32 like the single-device SRMSNorm; rms/layer weights are sharded with the heads."""

    def __init__(self, kind: str, full_dim: int, eps: float, group):
        super().__init__()
        self.kind, self.full_dim, self.eps, self.group = kind, full_dim, eps, group
        if kind in ("rms", "layer"):
            self.weight = nn.Parameter(torch.empty(full_dim // dist.get_world_size(group)))
        if kind == "layer":
            self.bias = nn.Parameter(torch.empty(full_dim // dist.get_world_size(group)))

    def _sum(self, x):
        return _AllReduceSum.apply(x.sum(-1, keepdim=True), self.group)

    def forward(self, x):
        xf = x.float() if x.dtype != torch.float64 else x
        if self.kind == "layer":
            xf = xf - self._sum(xf) / self.full_dim
        y = xf * torch.rsqrt(self._sum(xf * xf) / self.full_dim + self.eps)
        if self.kind == "rms":
            y = y * self.weight
        elif self.kind == "layer":
            y = y * self.weight + self.bias
        return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Tensor parallelism

# the hosts' command-line settings of the config fields that tensor parallelism splits
_SETTING = {"n_heads": "--decoder-attention-heads", "hidden_dim": "--hidden-dim", "glu_dim": "--glu-dim",
            "vocab_size": "the dictionary's size"}


def _check_divisible(model: TransNormerLLM, tp: int):
    cfg = model.cfg
    for name in ("n_heads", "hidden_dim", "glu_dim", "vocab_size"):
        value = getattr(cfg, name)
        if value % tp:
            raise ValueError(f"tensor parallelism: {name}={value} ({_SETTING[name]}) is not divisible by the "
                             f"model-parallel size {tp} (--model-parallel-size)")


def build_tensor_parallel(cfg: TransNormerConfig) -> TransNormerLLM:
    """This rank's shard of a new ``TransNormerLLM(cfg)``: exactly the slice of the model that the same call
    would make on one device under the same seed, built without ever holding that model (its structure on the
    meta device, then this rank's blocks of each parameter's initial value, made alone). Host memory: the shard
    plus one parameter's slice, so 65B and 175B presets build on every rank."""
    with torch.device("meta"):
        model = TransNormerLLM(cfg)
    return apply_tensor_parallel(model)


def apply_tensor_parallel(model: TransNormerLLM) -> TransNormerLLM:
    """Shard ``model`` in place over fairscale's (already initialised) model-parallel group, copying this
    rank's slice of its current weights, so that every rank building the model from one seed and sharding
    it computes exactly what the unsharded model computes. A model on the meta device (``build_tensor_parallel``)
    gets the slices of its initial values instead, on the CPU. Returns the model, with ``vocab_parallel = True``
    (its logits are this rank's slice of the vocabulary)."""
    from fairscale.nn.model_parallel import initialize as mpu
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    tp, rank, group = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank(), mpu.get_model_parallel_group()
    if tp == 1:
        return model
    if getattr(model, "vocab_parallel", False):
        raise ValueError("this model is already tensor-parallel")
    _check_divisible(model, tp)
    cfg = model.cfg
    param = next(model.parameters())
    full_shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
    if param.is_meta:       # each rank makes only its blocks of the initial values, one parameter at a time
        values = model.initializers()
    else:
        values = {k: lambda index, v=v: v.detach()[index] for k, v in model.state_dict().items()}
    slopes = decay_slopes(cfg).float().to("cpu" if param.is_meta else param.device)
    no_init = lambda w: w   # noqa: E731 -- the weights are copied from the full model below

    def column(linear, gather_output=False):
        return ColumnParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    gather_output=gather_output, init_method=no_init)

    def row(linear):
        return RowParallelLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 input_is_parallel=True, init_method=no_init)

    for i, layer in enumerate(model.layers):
        gla: GatedLinearAttention = layer.token_mixer
        gla.qkvu_proj, gla.out_proj = column(gla.qkvu_proj), row(gla.out_proj)
        gla.out_norm = ParallelOutNorm(cfg.norm, cfg.hidden_dim, cfg.norm_eps, group)
        gla.slope = slopes[i].chunk(tp)[rank].clone()
        if gla.lrpe is not None:
            gla.lrpe.theta = nn.Parameter(torch.empty_like(gla.lrpe.theta.chunk(tp)[rank]))
        sglu: SGLU = layer.channel_mixer
        sglu.l1, sglu.l2, sglu.l3 = column(sglu.l1), column(sglu.l2), row(sglu.l3)

    embed = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, init_method=no_init)
    # F.embedding's padding_idx indexes the local shard: only the rank holding the pad row keeps its gradient 0
    local_pad = cfg.pad_id - embed.vocab_start_index
    embed.padding_idx = local_pad if 0 <= local_pad < embed.num_embeddings_per_partition else None
    model.embed_tokens = embed
    model.lm_head = column(model.lm_head)

    for module in model.modules():  # what is still on the meta device gets (uninitialised) CPU memory
        if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            module.to_empty(device="cpu", recurse=False)
    model.to(device=param.device if not param.is_meta else "cpu", dtype=param.dtype)
    names = {k for k, _ in model.named_parameters()}
    if names != set(values):
        raise RuntimeError(f"tensor parallelism changed the parameter names: {sorted(names ^ set(values))}")
    with torch.no_grad():
        for name, make in values.items():
            blocks = _shard_blocks(full_shapes[name], _split_rule(name), rank, tp, name)
            model.get_parameter(name).copy_(torch.cat([make(idx) for idx in blocks]))
    model.vocab_parallel = True
    return model


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                                 reduction: str = "sum") -> torch.Tensor:
    """Cross entropy from logits sharded over the vocabulary, ignoring ``ignore_index`` targets: summed
    (``reduction="sum"``, what a fairseq criterion returns) or per token (``"none"``, 0 at ignored targets).
    fairscale's _VocabParallelCrossEntropy is exact but shifts its input in place and has no ignore_index:
    it gets an fp32 copy (so the caller's logits stay intact and the softmax is fp32) and the ignored positions
    are zeroed, which also zeroes their gradient."""
    from fairscale.nn.model_parallel.cross_entropy import vocab_parallel_cross_entropy as fairscale_vpce

    if logits_shard.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits_shard.shape)} do not match target {tuple(target.shape)}")
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    ignored = target == ignore_index
    loss = fairscale_vpce(logits_shard.to(torch.float32, copy=True), target.masked_fill(ignored, 0))
    loss = loss.masked_fill(ignored, 0.0)
    return loss.sum() if reduction == "sum" else loss


def gather_vocab_parallel_logits(logits_shard: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits from the shards (for generation and scoring): concatenated in model-parallel rank
    order, which is the order of the vocabulary shards (VocabParallelEmbedding and the LM head split by rank)."""
    from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region
    # contiguous: SequenceGenerator passes the last position, a strided view, which NCCL's all_gather refuses
    # (gloo copes)
    return gather_from_model_parallel_region(logits_shard.contiguous())


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing and FSDP, one block at a time

def _checkpointed_forward(block_forward, x, state=None, offset: int = 0, padding_mask=None,
                          state_in_place: bool = False):
    if not torch.is_grad_enabled() or state is not None:     # decoding / eval: nothing to save
        return block_forward(x, state, offset, padding_mask, state_in_place=state_in_place)
    return checkpoint(block_forward, x, state, offset, padding_mask, use_reentrant=False)


def checkpoint_block(block: nn.Module) -> nn.Module:
    """Recompute the block's activations in the backward pass. Its forward is replaced on the instance, so
    parameter names (and checkpoints) are unchanged; the RNG state is restored for the recomputation, so
    dropout masks match."""
    if not getattr(block, "activation_checkpointing", False):
        block.forward = functools.partial(_checkpointed_forward, block.forward)
        block.activation_checkpointing = True
    return block


def wrap_blocks(model: TransNormerLLM, wrap: Callable[[nn.Module], nn.Module]) -> TransNormerLLM:
    """Replace each block of ``model`` by ``wrap(block)`` (checkpointing, an FSDP unit, ...)."""
    for i, block in enumerate(model.layers):
        model.layers[i] = wrap(block)
    return model


def apply_activation_checkpointing(model: TransNormerLLM) -> TransNormerLLM:
    return wrap_blocks(model, checkpoint_block)


def build_block_by_block(cfg: TransNormerConfig, wrap: Callable[[nn.Module], nn.Module]) -> TransNormerLLM:
    """``TransNormerLLM(cfg)`` with each block replaced by ``wrap(block)``, the blocks made one at a time:
    the structure on the meta device, then one block's initial values (the same as ``TransNormerLLM(cfg)``
    makes under the same seed), which go to ``wrap`` before the next block is made; the embedding, final norm
    and LM head come last. With a wrapper that shards at once (fairscale's FSDP, through fairseq's
    ``fsdp_wrap`` under --ddp-backend fully_sharded) a rank holds its shards plus one whole block, the
    embedding and the LM head, never the whole model."""
    with torch.device("meta"):
        model = TransNormerLLM(cfg)
    initial = model.initializers()
    slopes = decay_slopes(cfg).float()

    def materialize(module: nn.Module, prefix: str):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(initial[prefix + name]())

    for i, block in enumerate(model.layers):
        block.token_mixer.slope = slopes[i].clone()     # before to_empty, whose GLA._apply keeps the decay rates
        materialize(block, f"layers.{i}.")
        model.layers[i] = wrap(block)
    for name, module in model.named_children():
        if name != "layers":
            materialize(module, name + ".")
    return model


# ---------------------------------------------------------------------------------------------------------
# fairseq 0.12's --model-parallel-size imports fairseq.model_parallel.megatron.mpu, a git submodule that the
# pip package does not ship. fairscale.nn.model_parallel derives from that same Megatron mpu with the same
# names, so the plugin registers it under the submodule's import path (only where the real one is missing).
# The CUDA RNG tracker needs CUDA; on CPU its seeding is skipped (CPU runs use the global generator).

def install_megatron_mpu_shim():
    name = "fairseq.model_parallel.megatron.mpu"
    if name in sys.modules:
        return
    try:
        import fairseq.model_parallel.megatron.mpu  # noqa: F401  the real submodule
        return
    except ImportError:
        pass
    from fairscale.nn.model_parallel import initialize, random

    def model_parallel_cuda_manual_seed(seed: int):
        if torch.cuda.is_available():
            random.model_parallel_cuda_manual_seed(seed)

    mpu = types.ModuleType(name)
    mpu.__doc__ = "fairscale.nn.model_parallel under the Megatron-submodule name fairseq imports (tnllm_plugin)"
    for attr in ("initialize_model_parallel", "model_parallel_is_initialized", "get_model_parallel_group",
                 "get_model_parallel_rank", "get_model_parallel_world_size", "get_model_parallel_src_rank",
                 "get_data_parallel_group", "get_data_parallel_rank", "get_data_parallel_world_size"):
        setattr(mpu, attr, getattr(initialize, attr))
    mpu.get_cuda_rng_tracker = random.get_cuda_rng_tracker
    mpu.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed
    megatron = types.ModuleType("fairseq.model_parallel.megatron")
    megatron.mpu = mpu
    sys.modules.setdefault("fairseq.model_parallel.megatron", megatron)
    sys.modules[name] = mpu
    # megatron_trainer imported before the shim existed decided it had no submodule: tell it otherwise
    trainer = sys.modules.get("fairseq.model_parallel.megatron_trainer")
    if trainer is not None and not trainer.has_megatron_submodule:
        for attr in ("get_data_parallel_rank", "get_data_parallel_world_size", "get_model_parallel_src_rank",
                     "get_cuda_rng_tracker"):
            setattr(trainer, attr, getattr(mpu, attr))
        trainer.has_megatron_submodule = True


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tnllm_plugin.parallel",
                                 description="Re-split fairseq checkpoints for another --model-parallel-size.")
    ap.add_argument("checkpoint", help="e.g. checkpoints/checkpoint_last.pt (parts -model_part-R are found)")
    ap.add_argument("--from-size", type=int, required=True)
    ap.add_argument("--to-size", type=int, required=True)
    ap.add_argument("--out", required=True, help="output name, e.g. mp4/checkpoint_last.pt")
    args = ap.parse_args(argv)
    for path in reshard_checkpoint(args.checkpoint, args.from_size, args.to_size, args.out):
        print(path)


if __name__ == "__main__":
    main()
