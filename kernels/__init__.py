"""tnllm_kernels: the kernels TransNormerLLM needs, each with a PyTorch reference beside it.

Installed under the import name ``tnllm_kernels`` (see setup.py) so that it never shadows
the PyPI package ``kernels``.
"""
from .fused_cross_entropy import linear_cross_entropy
from .gla_decode import gla_decode_step, gla_decode_step_applies
from .lightning_attention import lightning_attention, lightning_attention_step
from .srmsnorm import srms_norm, srms_norm_gate

# decode_linear's functions are imported from tnllm_kernels.decode_linear (their names are the subpackage's)
__all__ = ["gla_decode_step", "gla_decode_step_applies", "linear_cross_entropy", "lightning_attention",
           "lightning_attention_step", "srms_norm", "srms_norm_gate"]
