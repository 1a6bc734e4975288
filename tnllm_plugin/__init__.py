"""tnllm_plugin: TransNormerLLM for fairseq and Metaseq (``--user-dir tnllm_plugin``).

The model (``tnllm_plugin.model``) is plain PyTorch. The host adapters register it when their host is the
one importing this package (``fairseq-train --user-dir`` / ``metaseq-train --user-dir`` import the host
first), so that standalone use never pays for importing a training framework. Import
``tnllm_plugin.fairseq_adapter`` or ``tnllm_plugin.metaseq_adapter`` to register explicitly.
"""
import sys

from .model import DecodeState, TransNormerConfig, TransNormerLLM

if "fairseq" in sys.modules:
    from . import fairseq_adapter  # noqa: F401
if "metaseq" in sys.modules:
    from . import metaseq_adapter  # noqa: F401

__all__ = ["DecodeState", "TransNormerConfig", "TransNormerLLM"]
