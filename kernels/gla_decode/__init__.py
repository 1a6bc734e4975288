"""One decoding step of GLA's token mixer (activation, LRPE, state update, o = q S, output norm and gate) from the
QKVU projection of one token: PyTorch reference, and two Triton kernels on CUDA (triton_step.py)."""
import importlib.util

import torch

from ..decode_linear import row_sumsq
from .reference import ACTIVATIONS, check_with_sumsq, gla_decode_step_reference

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tests set this (with TRITON_INTERPRET=1 before the kernel module is imported) to run the Triton step on CPU
# tensors in the interpreter; otherwise CPU tensors always take the reference.
interpret_on_cpu = False


def gla_decode_step_applies(qkvu, state, positions=0, theta=None) -> bool:
    """Whether gla_decode_step would run the Triton kernels on these inputs (CUDA, fp32/bf16/fp16 activations, an
    fp32 state, head dim <= 256, everything on one device)."""
    if not _HAS_TRITON or not (qkvu.is_cuda or (interpret_on_cpu and qkvu.device.type == "cpu")):
        return False
    if qkvu.dtype not in _DTYPES or state.dtype != torch.float32 or qkvu.dim() != 2 or state.dim() != 4:
        return False
    from .triton_step import MAX_HEAD_DIM      # a real import error here is a bug: let it surface
    b, h, dk, e = state.shape
    tensors = [state] + [t for t in (positions, theta) if torch.is_tensor(t)]
    return (qkvu.shape == (b, 4 * h * e) and dk == (2 * e if theta is not None else e) and e <= MAX_HEAD_DIM
            and qkvu.stride(-1) == 1 and all(t.device == qkvu.device for t in tensors)
            and (not torch.is_tensor(positions) or tuple(positions.shape) == (b,)))


def gla_decode_step(qkvu, state, slope, positions=0, theta=None, act: str = "silu", norm_eps=None,
                    in_place: bool = False, with_sumsq: bool = False):
    """(y [B, hidden], new state): see gla_decode_step_reference for the contract. The Triton kernels where
    gla_decode_step_applies, else the reference. Not differentiable (decoding only). ``with_sumsq`` (without
    norm_eps): (o, new state, o's rows' sums of squares in parts [B, parts] fp32), for the next kernel's norm
    (tnllm_kernels.decode_linear's ``x_sumsq``)."""
    check_with_sumsq(with_sumsq, norm_eps, "gla_decode_step")
    if gla_decode_step_applies(qkvu, state, positions, theta):
        from .triton_step import gla_decode_step_triton
        return gla_decode_step_triton(qkvu, state, slope, positions, theta, act, norm_eps, in_place,
                                      with_sumsq=with_sumsq)
    out = gla_decode_step_reference(qkvu, state, slope, positions, theta, act, norm_eps, in_place)
    return (*out, row_sumsq(out[0])) if with_sumsq else out


__all__ = ["ACTIVATIONS", "gla_decode_step", "gla_decode_step_applies", "gla_decode_step_reference"]
