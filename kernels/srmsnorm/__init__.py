"""SRMSNorm (no learnable parameters): PyTorch reference, and the Triton kernel on CUDA."""
import importlib.util

import torch

from .reference import srms_norm_reference

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_triton(x, u=None) -> bool:
    """Whether the Triton kernels take x (and the gate u, which must match it), else the PyTorch reference."""
    if not (_HAS_TRITON and x.is_cuda and x.dtype in _TRITON_DTYPES and x.dim() >= 1 and x.shape[-1] > 0):
        return False
    return u is None or (u.is_cuda and u.dtype == x.dtype and u.shape == x.shape)


def srms_norm(x, eps: float = 1e-6):
    """x * rsqrt(mean(x^2, -1) + eps) in fp32, cast back: Triton on CUDA (fp32/bf16/fp16), else PyTorch."""
    if _use_triton(x):
        from .triton_srmsnorm import srms_norm_triton      # a real import error here is a bug: let it surface
        return srms_norm_triton(x, eps)
    return srms_norm_reference(x, eps)


def srms_norm_gate(x, u, eps: float = 1e-6):
    """srms_norm(x) * u (GLA's output norm and gate), fused into one kernel on CUDA."""
    if _use_triton(x, u):
        from .triton_srmsnorm import srms_norm_gate_triton
        return srms_norm_gate_triton(x, u, eps)
    return srms_norm_reference(x, eps) * u


def srms_norm_vjp(x, u=None, eps: float = 1e-6):
    """Where the Triton kernels run (see srms_norm_gate): (srms_norm(x) [* u], backward(dz) -> (dx, du or None)),
    the gradients of the kernels' autograd functions without an autograd pass; None elsewhere (use autograd)."""
    if _use_triton(x, u):
        from .triton_srmsnorm import srms_norm_vjp_triton
        return srms_norm_vjp_triton(x, u, eps)
    return None


__all__ = ["srms_norm", "srms_norm_gate", "srms_norm_reference", "srms_norm_vjp"]
