"""SRMSNorm in Triton, forward and backward, and the fused variant with the gate multiply that follows it in GLA.

    y = x * rsqrt(mean(x^2) + eps)            (fp32 math, result in x's dtype; no learnable parameters)
    z = y * u                                  (srms_norm_gate: GLA's  srms_norm(attn_out) * u)

Backward, with r = rsqrt(mean(x^2) + eps) and g the gradient reaching y:
    dx = r * g - x * r^3 * mean(g * x)
The forward saves r (fp32, one value per row) so the backward reads x, u and the incoming gradient once.
One program normalises BLOCK_R rows of up to BLOCK_D columns; rows wider than the largest block are walked.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .._interpreter import interpreting

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK_D = 8192


@triton.jit
def _srms_fwd_kernel(X, U, Y, RSTD, R, D, SU, eps,
                     HAS_U: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    base = rows.to(tl.int64)[:, None] * D
    ubase = rows.to(tl.int64)[:, None] * SU       # u's rows may be strided (GLA's gate: a slice of QKVU's output)
    cols = tl.arange(0, BLOCK_D)
    if ONE_PASS:
        m = rmask[:, None] & (cols[None, :] < D)
        x = tl.load(X + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        y = x * r[:, None]
        if HAS_U:
            y = y.to(Y.dtype.element_ty).to(tl.float32) * tl.load(U + ubase + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(Y + base + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            m = rmask[:, None] & ((d0 + cols)[None, :] < D)
            x = tl.load(X + base + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += x * x
        r = tl.rsqrt(tl.sum(acc, axis=1) / D + eps)
        for d0 in range(0, D, BLOCK_D):
            m = rmask[:, None] & ((d0 + cols)[None, :] < D)
            x = tl.load(X + base + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = x * r[:, None]
            if HAS_U:
                y = y.to(Y.dtype.element_ty).to(tl.float32) * tl.load(U + ubase + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(Y + base + d0 + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + rows, r, mask=rmask)


@triton.jit
def _srms_bwd_kernel(X, U, DZ, RSTD, DX, DU, R, D, SU,
                     HAS_U: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PASS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    base = rows.to(tl.int64)[:, None] * D
    ubase = rows.to(tl.int64)[:, None] * SU
    cols = tl.arange(0, BLOCK_D)
    r = tl.load(RSTD + rows, mask=rmask, other=0.0)
    if ONE_PASS:
        m = rmask[:, None] & (cols[None, :] < D)
        x = tl.load(X + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(DZ + base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_U:
            u = tl.load(U + ubase + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = (x * r[:, None]).to(DU.dtype.element_ty).to(tl.float32)
            tl.store(DU + base + cols[None, :], (g * y).to(DU.dtype.element_ty), mask=m)
            g = g * u
        c = tl.sum(g * x, axis=1) / D * r * r * r
        dx = g * r[:, None] - x * c[:, None]
        tl.store(DX + base + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            m = rmask[:, None] & ((d0 + cols)[None, :] < D)
            x = tl.load(X + base + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            g = tl.load(DZ + base + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_U:
                g = g * tl.load(U + ubase + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += g * x
        c = tl.sum(acc, axis=1) / D * r * r * r
        for d0 in range(0, D, BLOCK_D):
            m = rmask[:, None] & ((d0 + cols)[None, :] < D)
            x = tl.load(X + base + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            g = tl.load(DZ + base + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_U:
                u = tl.load(U + ubase + d0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
                y = (x * r[:, None]).to(DU.dtype.element_ty).to(tl.float32)
                tl.store(DU + base + d0 + cols[None, :], (g * y).to(DU.dtype.element_ty), mask=m)
                g = g * u
            dx = g * r[:, None] - x * c[:, None]
            tl.store(DX + base + d0 + cols[None, :], dx.to(DX.dtype.element_ty), mask=m)


def _launch_params(D):
    block_d = min(_MAX_BLOCK_D, max(16, triton.next_power_of_2(D)))
    one_pass = D <= block_d
    block_r = max(1, min(16, 2048 // block_d))          # several rows per program when rows are short
    num_warps = 4 if block_d * block_r <= 2048 else (8 if block_d * block_r <= 8192 else 16)
    if interpreting():
        num_warps = 4
    return block_r, block_d, one_pass, num_warps


def _check(x, u, eps):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"srms_norm_triton: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"srms_norm_triton: dtype {x.dtype} not supported (float32, bfloat16, float16)")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"srms_norm_triton: x needs a non-empty last dimension, got shape {tuple(x.shape)}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"srms_norm_triton: needs a CUDA tensor (the CPU path is srms_norm_reference), got {x.device}")
    if u is not None:
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"srms_norm_gate_triton: u must be a torch.Tensor, got {type(u).__name__}")
        if u.shape != x.shape:
            raise ValueError(f"srms_norm_gate_triton: u's shape {tuple(u.shape)} != x's {tuple(x.shape)}")
        if u.dtype != x.dtype:
            raise TypeError(f"srms_norm_gate_triton: u's dtype {u.dtype} != x's {x.dtype}")
        if u.device != x.device:
            raise ValueError(f"srms_norm_gate_triton: u is on {u.device}, x on {x.device}")
    if not float(eps) >= 0:
        raise ValueError(f"srms_norm_triton: eps must be >= 0, got {eps}")


def _rows(t, D):
    """t as [rows, D] with unit column stride and one row stride, a view where t allows it: the gate GLA passes is a
    slice of QKVU's output, which the backward keeps anyway; a contiguous copy of it would be kept besides."""
    t2 = t.reshape(-1, D)
    if t2.stride(-1) != 1 or (t2.shape[0] > 1 and t2.stride(0) < D):
        t2 = t2.contiguous()
    return t2


def _forward(x, u, eps):
    """(srms_norm(x) [* u], x as [rows, D] contiguous, u as [rows, D] rows (a strided view where _rows allows),
    rstd [rows] fp32): what the backward needs."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    u2 = _rows(u, D) if u is not None else None
    R = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    br, bd, one, nw = _launch_params(D)
    if R > 0:
        _srms_fwd_kernel[(triton.cdiv(R, br),)](x2, u2 if u2 is not None else x2, y, rstd, R, D,
                                               u2.stride(0) if u2 is not None else D, float(eps),
                                               HAS_U=u2 is not None, BLOCK_R=br, BLOCK_D=bd, ONE_PASS=one,
                                               num_warps=nw)
    return y.reshape(x.shape), x2, u2, rstd


def _backward(x2, u2, rstd, dz):
    """(dx, du or None) as [rows, D], from _forward's x2, u2, rstd and the output's gradient dz."""
    D = x2.shape[-1]
    R = x2.shape[0]
    dz2 = dz.reshape(-1, D).to(x2.dtype).contiguous()
    dx = torch.empty_like(x2)
    du = torch.empty_like(x2) if u2 is not None else None
    br, bd, one, nw = _launch_params(D)
    if R > 0:
        _srms_bwd_kernel[(triton.cdiv(R, br),)](x2, u2 if u2 is not None else x2, dz2, rstd, dx,
                                               du if du is not None else dx, R, D,
                                               u2.stride(0) if u2 is not None else D,
                                               HAS_U=u2 is not None, BLOCK_R=br, BLOCK_D=bd, ONE_PASS=one,
                                               num_warps=nw)
    return dx, du


class _SRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, eps):
        y, x2, u2, rstd = _forward(x, u, eps)
        ctx.save_for_backward(x2, u2, rstd)
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dz):
        dx, du = _backward(*ctx.saved_tensors, dz)
        return dx.reshape(ctx.shape), (du.reshape(ctx.shape) if du is not None else None), None


def srms_norm_vjp_triton(x: torch.Tensor, u: Optional[torch.Tensor] = None, eps: float = 1e-6):
    """(srms_norm(x) [* u], backward): backward(dz) -> (dx, du or None), the gradients autograd would compute
    through srms_norm_triton / srms_norm_gate_triton, bit for bit, without autograd (recompute.linears_after calls
    it inside a backward, where a nested autograd pass costs host time)."""
    _check(x, u, eps)
    y, x2, u2, rstd = _forward(x, u, eps)

    def backward(dz):
        dx, du = _backward(x2, u2, rstd, dz)
        return dx.reshape(x.shape), (du.reshape(x.shape) if du is not None else None)
    return y, backward


def srms_norm_triton(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2, -1) + eps), fp32 math, in x's dtype; forward and backward in Triton."""
    _check(x, None, eps)
    return _SRMSNormFunction.apply(x, None, eps)


def srms_norm_gate_triton(x: torch.Tensor, u: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """srms_norm(x) * u in one pass (the normalised x is rounded to x's dtype before the multiply, as the
    unfused two-step computation does); gradients to x and u."""
    _check(x, u, eps)
    return _SRMSNormFunction.apply(x, u, eps)


__all__ = ["srms_norm_triton", "srms_norm_gate_triton", "srms_norm_vjp_triton"]
