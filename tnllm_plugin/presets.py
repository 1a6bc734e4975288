"""Architecture presets: the paper's Table 10 shapes, plus a tiny one for CPU tests.

glu_dim follows the rule that reproduces the released 385M checkpoint (2816 for d_model 1024) and LLaMA's
FFN widths: 8/3 * d_model rounded up to a multiple of 256. The paper's Table 10 counts follow no single
glu_dim rule (see README, "Presets"); ``TABLE10_NON_EMBEDDING`` keeps its figures for comparison.
"""
import math
from typing import Dict

from .model import TransNormerConfig


def glu_dim_for(d_model: int, multiple_of: int = 256) -> int:
    return multiple_of * math.ceil(8 * d_model / 3 / multiple_of)


def _preset(n_layers, d_model, n_heads, **extra):
    return dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, hidden_dim=d_model,
                glu_dim=glu_dim_for(d_model), **extra)


PRESETS: Dict[str, dict] = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, hidden_dim=64, glu_dim=128),
    "385m": _preset(24, 1024, 8),
    "1b": _preset(16, 2048, 16),
    "3b": _preset(32, 2560, 20),
    "7b": _preset(30, 4096, 32),
    "13b": _preset(36, 5120, 40),
    "65b": _preset(72, 8192, 64),
    "175b": _preset(88, 12288, 96),
}

TABLE10_NON_EMBEDDING = {
    "385m": 384_974_848, "1b": 992_165_888, "3b": 2_876_006_400, "7b": 6_780_547_072,
    "13b": 12_620_195_840, "65b": 63_528_009_728, "175b": 173_356_498_944,
}


def preset_config(name: str, **overrides) -> TransNormerConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return TransNormerConfig(**{**PRESETS[name], **overrides})


def non_embedding_parameters(cfg: TransNormerConfig) -> int:
    """Counted from the shapes, without building the model (the 175B preset would not fit in memory):
    per layer the fused QKVU and output projections and SGLU's three matrices, plus LRPE's theta on the
    layers that use it and the weights of rms/layer norms. Embedding and LM head are excluded."""
    d, hd, g = cfg.d_model, cfg.hidden_dim, cfg.glu_dim
    per_layer = 4 * d * hd + hd * d + 3 * d * g
    if cfg.bias:
        per_layer += 4 * hd + d + 2 * g + d
    norm_params = {"srms": 0, "rms": 1, "layer": 2}[cfg.norm]
    per_layer += norm_params * (2 * d + hd)
    return cfg.n_layers * per_layer + len(cfg.lrpe_layers) * hd + norm_params * d
