"""The Triton SRMSNorm (and the fused norm * gate) against the float64 reference, forward and backward.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernel module is
imported); with CUDA the same tests run on the GPU, plus large shapes marked ``gpu``.
"""

import pytest
import torch

from triton_cpu import CUDA, DEV, import_kernel_module

import_kernel_module("tnllm_kernels.srmsnorm.triton_srmsnorm")
from tnllm_kernels.srmsnorm import srms_norm, srms_norm_gate  # noqa: E402
from tnllm_kernels.srmsnorm.reference import srms_norm_reference  # noqa: E402
from tnllm_kernels.srmsnorm.triton_srmsnorm import (srms_norm_gate_triton, srms_norm_triton,  # noqa: E402
                                                    srms_norm_vjp_triton)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def _check(shape, dtype, seed, gate):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(DEV, dtype).requires_grad_()
    u = torch.randn(shape, generator=g).to(DEV, dtype).requires_grad_()
    dz = torch.randn(shape, generator=g).to(DEV)
    z = srms_norm_gate_triton(x, u) if gate else srms_norm_triton(x)
    assert z.dtype == dtype and z.shape == x.shape
    (z.float() * dz).sum().backward()
    xd = x.detach().double().requires_grad_()
    ud = u.detach().double().requires_grad_()
    zd = srms_norm_reference(xd) * ud if gate else srms_norm_reference(xd)
    (zd * dz.double()).sum().backward()
    tol = TOL[dtype]
    assert rel(z, zd) < tol
    assert rel(x.grad, xd.grad) < tol
    if gate:
        assert rel(u.grad, ud.grad) < tol
    else:
        assert u.grad is None


@pytest.mark.parametrize("shape", [(3, 5, 40), (7, 300), (2, 9000), (1, 4096)])   # 9000 > one block: two passes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gate", [False, True])
def test_matches_float64_reference(shape, dtype, gate):
    _check(shape, dtype, seed=sum(shape), gate=gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate", [False, True])
def test_vjp_equals_the_autograd_function_bit_for_bit(dtype, gate):
    """srms_norm_vjp_triton (recompute.py's prefixes call it inside a backward): the kernels' autograd function's
    output and gradients, bit for bit, from a non-contiguous gate and an fp32 output gradient."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 5, 40, generator=g) * 3).to(DEV, dtype).requires_grad_()
    u = torch.randn(3, 5, 80, generator=g).to(DEV, dtype)[..., ::2].requires_grad_() if gate else None
    dz = torch.randn(3, 5, 40, generator=g).to(DEV)
    z = srms_norm_gate_triton(x, u) if gate else srms_norm_triton(x)
    z.backward(dz)
    y, backward = srms_norm_vjp_triton(x.detach(), u.detach() if gate else None)
    dx, du = backward(dz)
    assert torch.equal(y, z) and torch.equal(dx, x.grad)
    assert torch.equal(du, u.grad) if gate else du is None


@pytest.mark.parametrize("dim", [48, 9008, 9000])        # one pass, two passes; 9000: rows not 16-aligned
def test_a_gate_sliced_from_a_wider_tensor_is_read_in_place(dim):
    """GLA's gate u is the last quarter of QKVU's output: its rows are strided. The kernels read it where it is (the
    forward keeps a view of it for backward, not a contiguous copy). Where the strided and the copied rows have the
    same alignment (row strides both multiples of 16, as the model's widths), Triton compiles the same code for
    both and the results are equal bit for bit; otherwise (9000 against 36000: on an H200 the compiled reductions
    differ, dx by rounding) both are checked against float64 instead."""
    from tnllm_kernels.srmsnorm import triton_srmsnorm as ts
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, dim, generator=g).to(DEV, torch.bfloat16)
    qkvu = torch.randn(2, 3, 4 * dim, generator=g).to(DEV, torch.bfloat16)
    u = qkvu.chunk(4, dim=-1)[3]
    dz = torch.randn(2, 3, dim, generator=g).to(DEV)
    y, x2, u2, rstd = ts._forward(x, u, 1e-6)
    assert u2.untyped_storage().data_ptr() == qkvu.untyped_storage().data_ptr()
    dx, du = ts._backward(x2, u2, rstd, dz)
    dx, du = dx.reshape(x.shape), du.reshape(x.shape)
    if dim % 16 == 0:
        want_y, backward = srms_norm_vjp_triton(x, u.contiguous())
        want_dx, want_du = backward(dz)
        assert torch.equal(y, want_y) and torch.equal(dx, want_dx) and torch.equal(du, want_du)
    else:
        xd = x.double().requires_grad_()
        ud = u.double().requires_grad_()
        zd = srms_norm_reference(xd) * ud
        (zd * dz.double()).sum().backward()
        tol = TOL[torch.bfloat16]
        assert rel(y, zd) < tol and rel(dx, xd.grad) < tol and rel(du, ud.grad) < tol


def test_dispatch_and_non_contiguous_input():
    x = torch.randn(4, 6, 32, device=DEV).transpose(0, 1)        # non-contiguous
    u = torch.randn(6, 4, 32, device=DEV)
    ref = srms_norm_reference(x.double())
    assert rel(srms_norm_triton(x), ref) < 1e-5
    assert rel(srms_norm_gate_triton(x, u), ref * u.double()) < 1e-5
    assert rel(srms_norm(x), ref) < 1e-5                            # the package entry point (reference on CPU)
    assert rel(srms_norm_gate(x, u), ref * u.double()) < 1e-5


def test_clear_errors(monkeypatch):
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(TypeError, match="dtype"):
        srms_norm_triton(x.double())
    with pytest.raises(TypeError, match="dtype"):
        srms_norm_triton(x.long())
    with pytest.raises(ValueError, match="shape"):
        srms_norm_gate_triton(x, torch.randn(2, 4, device=DEV))
    with pytest.raises(TypeError, match="dtype"):
        srms_norm_gate_triton(x, x.half())
    with pytest.raises(ValueError, match="last dimension"):
        srms_norm_triton(torch.randn(2, 0, device=DEV))
    with pytest.raises(TypeError, match="torch.Tensor"):
        srms_norm_triton([1.0, 2.0])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        srms_norm_triton(torch.randn(2, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gate", [False, True])
def test_gpu_large(dtype, gate):
    _check((8192, 4096), dtype, seed=1, gate=gate)
    _check((300, 20000), dtype, seed=2, gate=gate)
