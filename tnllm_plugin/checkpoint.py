"""The released checkpoints' layout (OpenNLPLab's Hugging Face TransNormerLLM) <-> this plugin's model.

The plugin's parameter names are the released ones without the ``model.`` prefix, so mapping is renaming;
what needs care is the config (per-layer LRPE list, special ids) and naming every tensor that does not fit.
"""
from typing import Dict, Mapping

import torch

from .model import TransNormerConfig

RELEASED_PREFIX = "model."
NORM_TYPES = {"simplermsnorm": "srms", "rmsnorm": "rms", "layernorm": "layer"}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "1+elu": "1+elu", "elu": "1+elu", "none": "none"}


def config_from_released(hf: Mapping) -> TransNormerConfig:
    """A released ``config.json`` dict -> TransNormerConfig (decay schedule ``released``)."""
    missing = [k for k in ("vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads",
                           "glu_dim") if k not in hf]
    if missing:
        raise ValueError(f"released config lacks keys {missing}")
    n_layers = int(hf["decoder_layers"])
    d_model = int(hf["decoder_embed_dim"])
    lrpe_layers = (0,)              # the released default: LRPE on the first layer only
    if "linear_use_lrpe_list" in hf:
        lrpe_list = list(hf["linear_use_lrpe_list"])
        if len(lrpe_list) != n_layers:
            raise ValueError(f"linear_use_lrpe_list has {len(lrpe_list)} entries for {n_layers} layers")
        lrpe_layers = tuple(i for i, use in enumerate(lrpe_list) if use)
    norm = hf.get("norm_type", "simplermsnorm")
    act = hf.get("linear_act_fun", "silu")
    if norm not in NORM_TYPES:
        raise ValueError(f"unknown released norm_type {norm!r}; known: {sorted(NORM_TYPES)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown released linear_act_fun {act!r}; known: {sorted(ACTIVATIONS)}")
    return TransNormerConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=int(hf["decoder_attention_heads"]),
        hidden_dim=int(hf.get("hidden_dim", d_model)),
        glu_dim=d_model if int(hf["glu_dim"]) == -1 else int(hf["glu_dim"]),   # released: -1 means d_model
        lrpe_layers=lrpe_layers,
        decay="released",
        qk_act=ACTIVATIONS[act],
        norm=NORM_TYPES[norm],
        bias=bool(hf.get("bias", False)),
        no_scale_embedding=bool(hf.get("no_scale_embedding", False)),
        init_std=float(hf.get("init_std", 0.02)),
        pad_id=int(hf.get("pad_token_id", 0)),
        bos_id=int(hf.get("bos_token_id", 1)),
        eos_id=int(hf.get("eos_token_id", 2)),
    )


def config_to_released(cfg: TransNormerConfig) -> Dict:
    if cfg.decay != "released":
        raise ValueError("the released layout only describes the 'released' decay schedule")
    norm = {v: k for k, v in NORM_TYPES.items()}[cfg.norm]
    act = {"silu": "silu", "1+elu": "1+elu", "none": "none"}[cfg.qk_act]
    return {
        "vocab_size": cfg.vocab_size, "decoder_embed_dim": cfg.d_model, "decoder_layers": cfg.n_layers,
        "decoder_attention_heads": cfg.n_heads, "hidden_dim": cfg.hidden_dim, "glu_dim": cfg.glu_dim,
        "linear_use_lrpe_list": [int(i in cfg.lrpe_layers) for i in range(cfg.n_layers)],
        "norm_type": norm, "linear_act_fun": act, "bias": cfg.bias,
        "no_scale_embedding": cfg.no_scale_embedding, "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id, "init_std": cfg.init_std, "model_type": "transnormer",
        "architectures": ["TransnormerForCausalLM"],
    }


def state_dict_from_released(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Released names -> plugin names (``model.`` prefix dropped; ``lm_head`` unchanged)."""
    return {(k[len(RELEASED_PREFIX):] if k.startswith(RELEASED_PREFIX) else k): v for k, v in sd.items()}


def state_dict_to_released(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {(k if k.startswith("lm_head.") else RELEASED_PREFIX + k): v for k, v in sd.items()}


def load_checked(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped tensor before touching the model."""
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)


def check_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor of ``sd`` for ``model``, and every
    one that is not floating point or holds NaN / inf (resuming from it would only train NaNs)."""
    check_tensor_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd)
    check_tensor_values(sd)


def check_tensor_shapes(expected: Mapping[str, tuple], sd: Mapping[str, torch.Tensor]) -> None:
    """check_state_dict against a table of names -> shapes (e.g. of a model built on the meta device, or
    with the names of another layout), so that the error names tensors as the checkpoint file does."""
    own = {k: tuple(s) for k, s in expected.items()}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mis_shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {own[k]}"
                  for k in sorted(set(own) & set(sd)) if tuple(sd[k].shape) != own[k]]
    problems = []
    if mis_shaped:
        problems.append("shape mismatch: " + "; ".join(mis_shaped))
    if missing:
        problems.append(f"missing from checkpoint: {missing}")
    if unexpected:
        problems.append(f"not in the model: {unexpected}")
    if problems:
        raise ValueError("checkpoint does not match the architecture: " + " | ".join(problems))


def check_tensor_values(tensors: Mapping[str, torch.Tensor]) -> None:
    """Every tensor floating point and finite (convert runs it on each file as it reads it, to name the file)."""
    not_float = [f"{k} ({t.dtype})" for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise ValueError(f"tensors that should be floating point are not: {not_float}")
    # a NaN or inf weight makes every output NaN: the mark of a corrupt file (a bit flip in an exponent)
    non_finite = [k for k, t in tensors.items() if not all(bool(part.isfinite().all())
                                                           for part in t.reshape(-1).split(1 << 24))]
    if non_finite:
        raise ValueError(f"tensors holding NaN or inf: {non_finite}")
