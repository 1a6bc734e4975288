"""The linear layers of a one-token decoding step with their neighbours fused in (the block's norm before QKVU,
GLA's output norm and gate before W_o, SGLU's pair and product, the residual adds after W_o and W_3): PyTorch
reference, and one Triton GEMV kernel on CUDA (triton_gemv.py). Also the step's scaled embedding lookup in one
kernel (triton_embedding.py)."""
import importlib.util

import torch

from .reference import decode_embedding_reference, decode_linear_reference

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# decoding batches; larger ones keep cuBLAS. Up to 4 rows the kernel sums broadcast products, from 5 it runs tl.dot
# on tensor cores (K split over programs for the narrow layers): on an H200 one block's four layers of the 385M model
# took 12.2 us at 1 row and 18.6 at 16 against 60.6 and 66.1 for cuBLAS with the norm, gate, product and add kernels
# around it, and the CUDA-graph decode step at batch 16 went from 1.17 to 0.86-0.92 ms (with the tuned token-mixer step;
# 0.80-0.87 with the tiles of the twelfth session's in-step sweep, 0.76-0.83 with the norms' sums of squares handed on
# and the weights prefetched into L2, fourteenth session; benchmarks/RESULTS.md). tests/test_decode_linear.py passed
# on that GPU.
MAX_ROWS = 16

# Tests set this (with TRITON_INTERPRET=1 before the kernel module is imported) to run the kernel on CPU tensors in
# the interpreter; otherwise CPU tensors always take the reference.
interpret_on_cpu = False


def _kernels_run_on(t) -> bool:
    """Whether this package's Triton kernels can take t's device: CUDA, or the CPU in the tests' interpreter."""
    return _HAS_TRITON and (t.is_cuda or (interpret_on_cpu and t.device.type == "cpu"))


def decode_linear_applies(x, weight, norm_eps=None, gate=None, weight2=None, residual=None) -> bool:
    """Whether decode_linear would run the Triton kernel: CUDA, at most MAX_ROWS rows, one float dtype for every
    tensor (fp32, bf16, fp16), contiguous rows, shapes that fit, autocast off (under autocast the composition's
    matmuls would run in another dtype than its tensors)."""
    if not _kernels_run_on(x):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    tensors = [t for t in (x, weight, gate, weight2, residual) if t is not None]
    if x.dtype not in _DTYPES or any(t.dtype != x.dtype or t.device != x.device or t.dim() != 2 or t.stride(-1) != 1
                                     for t in tensors):
        return False
    (b, k), n = x.shape, weight.shape[0]
    return (0 < b <= MAX_ROWS and weight.shape[1] == k
            and (gate is None or gate.shape == x.shape)
            and (weight2 is None or weight2.shape == weight.shape)
            and (residual is None or residual.shape == (b, n)))


def check_sumsq_parts(x_sumsq, x, where: str):
    """x_sumsq, when given, must be x's rows' sums of squares in parts: fp32 [B, parts] (1 <= parts <= 4096),
    contiguous, on x's device (what decode_linear and gla_decode_step return with ``with_sumsq``)."""
    if x_sumsq is None:
        return
    if not isinstance(x_sumsq, torch.Tensor) or x_sumsq.dtype != torch.float32 or x_sumsq.dim() != 2:
        raise ValueError(f"{where}: x_sumsq must be a float32 tensor [B, parts] of the rows' sums of squares, got "
                         f"{getattr(x_sumsq, 'dtype', type(x_sumsq).__name__)} {tuple(getattr(x_sumsq, 'shape', ()))}")
    if x_sumsq.shape[0] != x.shape[0] or not 1 <= x_sumsq.shape[1] <= 4096 or not x_sumsq.is_contiguous() \
            or x_sumsq.device != x.device:
        raise ValueError(f"{where}: x_sumsq {tuple(x_sumsq.shape)} on {x_sumsq.device} must be contiguous "
                         f"[B={x.shape[0]}, 1..4096 parts] on {x.device}")


def row_sumsq(y):
    """y's rows' sums of squares as one part ([B, 1] fp32): what the references return with ``with_sumsq``."""
    return y.float().square().sum(-1, keepdim=True)


def decode_linear(x, weight, norm_eps=None, gate=None, weight2=None, residual=None, x_sumsq=None,
                  with_sumsq: bool = False):
    """decode_linear_reference's value (see there), in one Triton kernel where decode_linear_applies, else the
    reference. Not differentiable (decoding only).

    ``x_sumsq`` (optional, read with ``norm_eps`` only): x's rows' sums of squares in parts, as the kernel that wrote
    x returned them; the kernel's norm then sums those parts instead of reading x's rows once more (on an H200 that
    second read was ~80 us of the 385M decode step at 16 rows, benchmarks/RESULTS.md). The reference computes the
    norm from x. ``with_sumsq``: return (y, y's rows' sums of squares in parts) for the next kernel's norm."""
    check_sumsq_parts(x_sumsq, x, "decode_linear")
    if decode_linear_applies(x, weight, norm_eps, gate, weight2, residual):
        from .triton_gemv import decode_linear_triton      # a real import error here is a bug: let it surface
        return decode_linear_triton(x, weight, norm_eps, gate, weight2, residual, x_sumsq=x_sumsq,
                                    with_sumsq=with_sumsq)
    y = decode_linear_reference(x, weight, norm_eps, gate, weight2, residual)
    return (y, row_sumsq(y)) if with_sumsq else y


def decode_embedding_applies(weight, tokens) -> bool:
    """Whether decode_embedding would run the Triton kernel: CUDA (or the tests' interpreter), tokens [B, 1] of at
    most MAX_ROWS int32/int64 ids on the weight's device, a float weight [vocab, d] with contiguous rows."""
    if not _kernels_run_on(weight):
        return False
    return (weight.dtype in _DTYPES and weight.dim() == 2 and weight.stride(-1) == 1
            and tokens.device == weight.device and tokens.dtype in (torch.int32, torch.int64)
            and tokens.dim() == 2 and tokens.shape[1] == 1 and 0 < tokens.shape[0] <= MAX_ROWS)


def decode_embedding(weight, tokens, scale: float = 1.0):
    """decode_embedding_reference's value (weight's rows for tokens [B, 1], times scale), in one Triton kernel where
    decode_embedding_applies, else the reference. Not differentiable (decoding only)."""
    if decode_embedding_applies(weight, tokens):
        from .triton_embedding import decode_embedding_triton
        return decode_embedding_triton(weight, tokens, scale)
    return decode_embedding_reference(weight, tokens, scale)


__all__ = ["MAX_ROWS", "check_sumsq_parts", "decode_embedding", "decode_embedding_applies", "decode_embedding_reference",
           "decode_linear", "decode_linear_applies", "decode_linear_reference", "row_sumsq"]
