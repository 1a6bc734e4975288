"""Causal decayed linear attention (lightning attention): naive left product, block form, recurrence,
and (on CUDA) the Triton kernel. ``lightning_attention`` is the one entry point the model calls."""
from .chunk import lightning_attention_chunk
from .naive import lightning_attention_naive
from .recurrent import lightning_attention_recurrent, lightning_attention_step


def lightning_attention(q, k, v, slope, initial_state=None, block_size: int = 64):
    """Returns (o, final_state). CPU tensors take the PyTorch block form; CUDA tensors take the Triton kernel
    when it is available."""
    if q.is_cuda:
        try:
            from .triton_chunk import lightning_attention_triton
        except ImportError:
            lightning_attention_triton = None
        if lightning_attention_triton is not None:
            return lightning_attention_triton(q, k, v, slope, initial_state)
    return lightning_attention_chunk(q, k, v, slope, initial_state, block_size)


__all__ = ["lightning_attention", "lightning_attention_chunk", "lightning_attention_naive",
           "lightning_attention_recurrent", "lightning_attention_step"]
