"""SRMSNorm (no learnable parameters): PyTorch reference, and the Triton kernel on CUDA."""
from .reference import srms_norm_reference


def srms_norm(x, eps: float = 1e-6):
    if x.is_cuda:
        try:
            from .triton_srmsnorm import srms_norm_triton
        except ImportError:
            srms_norm_triton = None
        if srms_norm_triton is not None:
            return srms_norm_triton(x, eps)
    return srms_norm_reference(x, eps)


__all__ = ["srms_norm", "srms_norm_reference"]
