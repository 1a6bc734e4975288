"""SRMSNorm as the released checkpoints compute it: x * rsqrt(mean(x^2) + eps) in fp32, cast back."""
import torch


def srms_norm_reference(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
