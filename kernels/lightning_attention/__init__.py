"""Causal decayed linear attention (lightning attention): naive left product, block form, recurrence,
and (on CUDA) the Triton kernel. ``lightning_attention`` is the one entry point the model calls."""
import importlib.util

import torch

from .chunk import lightning_attention_chunk
from .naive import lightning_attention_naive
from .recurrent import lightning_attention_recurrent, lightning_attention_step

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_can_take(q, k, v) -> bool:
    if not (_HAS_TRITON and q.is_cuda):
        return False
    from .triton_chunk import MAX_DK, MAX_DV      # a real import error here is a bug: let it surface
    return (q.dtype in _TRITON_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.dim() == 4 and q.shape[-1] <= MAX_DK and v.shape[-1] <= MAX_DV)


def lightning_attention(q, k, v, slope, initial_state=None, block_size: int = 64):
    """Returns (o, final_state). CUDA tensors of a dtype and head size the Triton kernel takes (fp32/bf16/fp16,
    Dk <= 256, Dv <= 128) go to the Triton kernel; everything else (CPU, float64, larger heads) takes the
    PyTorch block form."""
    if _triton_can_take(q, k, v):
        from .triton_chunk import lightning_attention_triton
        chunk = block_size if block_size in (16, 32, 64, 128) else 64
        return lightning_attention_triton(q, k, v, slope, initial_state, output_final_state=True, chunk_size=chunk)
    return lightning_attention_chunk(q, k, v, slope, initial_state, block_size)


__all__ = ["lightning_attention", "lightning_attention_chunk", "lightning_attention_naive",
           "lightning_attention_recurrent", "lightning_attention_step"]
