"""The LM head and cross entropy fused, chunked over tokens (the [tokens, vocab] logits never exist whole), with
the unfused PyTorch reference beside it. ``linear_cross_entropy`` is the entry point the model calls."""
from .chunked import DEFAULT_CHUNK, LinearCrossEntropyFunction, check_target_ids, linear_cross_entropy_chunked
from .reference import linear_cross_entropy_reference

linear_cross_entropy = linear_cross_entropy_chunked

__all__ = ["DEFAULT_CHUNK", "LinearCrossEntropyFunction", "check_target_ids", "linear_cross_entropy",
           "linear_cross_entropy_chunked", "linear_cross_entropy_reference"]
