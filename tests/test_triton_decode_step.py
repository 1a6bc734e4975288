"""The fused one-token step of GLA's token mixer (tnllm_kernels.gla_decode: activation, LRPE, state update,
o = q S, norm and gate in two Triton kernels) against the PyTorch composition it replaces, and in the model.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernel module is
imported) at small shapes; with CUDA the same tests run on the GPU, plus the tests marked ``gpu`` (the 385M shape,
a CUDA-graph replay, the model's graph decoder).

Two references per step: the composition in float64 (no rounding but the inputs'), and the composition in the
kernel's own dtype, whose roundings (activation, LRPE, o, norm, gate) the kernel follows: against the first the
kernel may be off by no more than the composition itself (x 1.5, plus fp32 summation order), against the second
by fp32 summation order only. In bf16/fp16 that order can flip a rounding now and then: such an element is off by
at most three steps of the output's precision (o, the normalised o and the gated product are each rounded), or,
where o is a near-cancelling sum, by the fp32 noise of its terms (2^-16 of the largest output bounds it here).
"""
import os
import sys

import pytest
import torch

from triton_cpu import CUDA, DEV, import_kernel_module

import_kernel_module("tnllm_kernels.gla_decode.triton_step")
import tnllm_kernels.gla_decode as gla_decode  # noqa: E402
from tnllm_kernels.gla_decode import gla_decode_step, gla_decode_step_applies  # noqa: E402
from tnllm_kernels.gla_decode.reference import gla_decode_step_reference  # noqa: E402
from tnllm_kernels.gla_decode.triton_step import MAX_HEAD_DIM, _step_tiles, gla_decode_step_triton  # noqa: E402
from tnllm_plugin.model import LRPE, GatedLinearAttention, TransNormerConfig, decay_slopes  # noqa: E402

EPS = 1e-6
# against the same-dtype composition: fp32 sums in another order (fp32), or that plus rounding flips of the output
# dtype (bf16, fp16): the largest relative step of its precision, three roundings in a row, in at most 1% of the
# elements (the fp32 noise flips a bf16 rounding about once in 10^3 in the 385M shape; a wrong step changes most)
SAME_FP32 = 2e-6
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
FLIPS = 0.01
# what the composition's own error may be exceeded by: fp32 summation order
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_inputs(B, H, E, lrpe, dtype, seed, state_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(B, H, 2 * E if lrpe else E, E, generator=g) * state_scale
    theta = (LRPE.frequencies(H, E) * (1 + torch.rand(H, 1, E, generator=g))) if lrpe else None
    return g, state.to(DEV), None if theta is None else theta.to(DEV)


def next_qkvu(g, B, H, E, dtype):
    return (torch.randn(B, 4 * H * E, generator=g) * 1.5).to(DEV, dtype)


def outputs_within(y, y_same, y64, dtype, label):
    """y (kernel) against the same-dtype composition and the float64 one."""
    assert y.dtype == dtype and y.shape == y64.shape, label
    assert torch.isfinite(y).all(), label
    if dtype == torch.float32:
        assert rel(y, y_same) <= SAME_FP32, f"{label}: vs fp32 composition {rel(y, y_same):.3g}"
    else:   # elementwise: the same value, or a few rounding steps away in a few elements
        diff = (y.double() - y_same.double()).abs()
        bound = 3 * ULP[dtype] * y_same.double().abs() + 2.0 ** -16 * y_same.double().abs().max()
        assert (diff <= bound).all(), f"{label}: {int((diff > bound).sum())} elements more than 3 steps off"
        flips = int((y != y_same).sum())
        assert flips <= 2 + FLIPS * y.numel(), f"{label}: {flips} of {y.numel()} elements differ"
    err, err_same = rel(y, y64), rel(y_same, y64)
    assert err <= 1.5 * err_same + FLOOR[dtype], f"{label}: {err:.3g} vs float64, composition's own {err_same:.3g}"


def run_steps(B, H, E, lrpe, act, dtype, slopes, positions, steps, in_place, norm=True, seed=0, kernel=None):
    """``steps`` steps carried over in the kernel, the same-dtype composition and the float64 composition;
    every output and state checked. ``positions``: "row" (per-row tensor) or an int start."""
    kernel = kernel or gla_decode_step_triton
    g, state, theta = make_inputs(B, H, E, lrpe, dtype, seed)
    slope = torch.tensor(slopes, dtype=torch.float32, device=DEV)
    s_kernel, s_same, s64 = state.clone(), state.clone(), state.double()
    if positions == "row":
        pos = torch.tensor([7 + 1000 * r for r in range(B)], device=DEV)
    else:
        pos = positions
    eps = EPS if norm else None
    for t in range(steps):
        qkvu = next_qkvu(g, B, H, E, dtype)
        before = s_kernel.clone()
        y, new = kernel(qkvu, s_kernel, slope, pos, theta, act, eps, in_place=in_place)
        if in_place:
            assert new is s_kernel
        else:
            assert new is not s_kernel and torch.equal(s_kernel, before), "the input state was changed"
        s_kernel = new
        y_same, s_same = gla_decode_step_reference(qkvu, s_same, slope, pos, theta, act, eps)
        y64, s64 = gla_decode_step_reference(qkvu.double(), s64, slope.double(), pos,
                                             None if theta is None else theta.double(), act, eps)
        label = f"step {t}"
        outputs_within(y, y_same, y64, dtype, label)
        assert new.dtype == torch.float32
        assert rel(new, s_same) <= SAME_FP32, f"{label}: state vs composition {rel(new, s_same):.3g}"
        assert rel(new, s64) <= 1.5 * rel(s_same, s64) + FLOOR[torch.float32], f"{label}: state vs float64"
        pos = pos + 1
    return y, s_kernel


# (B, H, E, lrpe, act, dtype, slopes, positions, steps, in_place)
CASES = [
    (1, 2, 16, False, "silu", torch.float32, [0.0, 0.5], "row", 3, True),          # batch 1, lambda = 1
    (3, 2, 16, False, "silu", torch.bfloat16, [0.0, 0.5], "row", 3, False),
    (1, 2, 16, True, "silu", torch.float32, [0.02, 12.0], "row", 3, True),         # LRPE (Dk = 2E), large slope
    (3, 2, 16, True, "silu", torch.bfloat16, [0.02, 12.0], 5, 3, True),            # int start position
    (2, 3, 12, False, "1+elu", torch.float32, [0.0, 1e-4, 3.0], "row", 3, False),  # E not a power of two
    (2, 3, 12, True, "1+elu", torch.bfloat16, [0.0, 1e-4, 3.0], "row", 3, True),
    (2, 2, 48, True, "none", torch.float32, [0.3, 40.0], "row", 2, True),          # 3 column tiles, lambda ~ 0
    (1, 2, 48, False, "none", torch.bfloat16, [0.3, 40.0], 100000, 2, False),      # far position (no LRPE: unused)
    (2, 2, 16, True, "none", torch.float16, [0.1, 0.9], "row", 2, True),
    (2, 2, 16, False, "silu", torch.float16, [0.1, 0.9], 0, 2, False),
]


@pytest.mark.parametrize("B,H,E,lrpe,act,dtype,slopes,positions,steps,in_place", CASES)
def test_matches_the_composition_over_several_steps(B, H, E, lrpe, act, dtype, slopes, positions, steps, in_place):
    run_steps(B, H, E, lrpe, act, dtype, slopes, positions, steps, in_place, seed=B * 100 + E)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_the_norm_gives_o(dtype):
    run_steps(2, 2, 16, True, "silu", dtype, [0.0, 0.4], "row", 2, True, norm=False, seed=3)


@pytest.mark.parametrize("B,H,E,lrpe,tiles", [(2, 2, 16, True, None), (3, 3, 12, False, None),
                                               (2, 2, 48, False, (16, 4))])
def test_with_sumsq_returns_o_and_its_sums_of_squares(B, H, E, lrpe, tiles):
    """with_sumsq: the same o and state, and one part per (head, column tile) whose sum is o's rows' sums of squares
    (of o as stored, in fp32): E not a power of two, 3 column tiles a head. With the norm it is refused (the step
    then returns srms_norm(o) * u, not o)."""
    g, state, theta = make_inputs(B, H, E, lrpe, torch.bfloat16, seed=11)
    slope = torch.linspace(0.1, 2.0, H, device=DEV)
    qkvu = next_qkvu(g, B, H, E, torch.bfloat16)
    pos = torch.arange(B, device=DEV) + 3
    o, new = gla_decode_step_triton(qkvu, state, slope, pos, theta, "silu", None, tiles=tiles)
    o2, new2, parts = gla_decode_step_triton(qkvu, state, slope, pos, theta, "silu", None, tiles=tiles,
                                             with_sumsq=True)
    assert torch.equal(o, o2) and torch.equal(new, new2)
    bv = tiles[0] if tiles else None
    assert parts.dtype == torch.float32 and parts.shape[0] == B
    if bv:
        assert parts.shape[1] == H * -(-E // bv)
    assert rel(parts.sum(1), o.float().square().sum(1)) <= SAME_FP32
    with pytest.raises(ValueError, match="with_sumsq"):
        gla_decode_step_triton(qkvu, state, slope, pos, theta, "silu", EPS, with_sumsq=True)
    ref = gla_decode_step(qkvu.cpu(), state.cpu(), slope.cpu(), pos.cpu(), None if theta is None else theta.cpu(),
                          "silu", None, with_sumsq=True)
    assert ref[2].shape == (B, 1) and torch.equal(ref[2][:, 0], ref[0].float().square().sum(1))


def test_far_lrpe_positions():
    """Angles p theta of tens of thousands of radians (the released theta's first frequency is 1): the kernel's
    cos/sin reduce them as torch does."""
    run_steps(2, 2, 16, True, "silu", torch.float32, [0.01, 0.1], 50000, 2, True, seed=9)


def _wrong(mistake):
    """A kernel with one mistake, to show the checks above catch it."""
    def kernel(qkvu, state, slope, pos, theta, act, eps, in_place):
        if mistake == "slope":
            slope = slope + 0.05
        elif mistake == "position":
            pos = pos + 1
        elif mistake == "theta":
            theta = theta * 1.01
        elif mistake == "activation":
            act = "1+elu" if act == "silu" else "silu"
        elif mistake == "no decay":
            slope = torch.zeros_like(slope)
        elif mistake == "eps":
            eps = 1.0
        y, new = gla_decode_step_triton(qkvu, state, slope, pos, theta, act, eps, in_place)
        if mistake == "stale state":
            new = state.clone() if not in_place else new.copy_(state * 0.999)
        return y, new
    return kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mistake", ["slope", "position", "theta", "activation", "no decay", "eps", "stale state"])
def test_the_checks_catch_a_wrong_step(mistake, dtype):
    with pytest.raises(AssertionError):
        run_steps(2, 2, 16, True, "silu", dtype, [0.3, 1.5], "row", 2, mistake == "stale state",
                  seed=5, kernel=_wrong(mistake))


def test_the_checks_catch_a_missing_lrpe():
    """The LRPE layer's state shape needs theta: without it the kernel refuses rather than misreading the state."""
    _, state, theta = make_inputs(1, 2, 16, True, torch.float32, 0)
    qkvu = torch.randn(1, 4 * 32, device=DEV)
    with pytest.raises(ValueError, match="Dk"):
        gla_decode_step_triton(qkvu, state, torch.zeros(2, device=DEV), 3, None)
    # and LRPE with theta = 0 (cos 1, sin 0) is not the step without LRPE's output: the checks see the difference
    y, _ = gla_decode_step_triton(qkvu, state, torch.zeros(2, device=DEV), 3, torch.zeros_like(theta), "silu", EPS)
    y_ref, _ = gla_decode_step_reference(qkvu.double(), state.double(), torch.zeros(2, device=DEV, dtype=torch.float64),
                                         3, theta.double(), "silu", EPS)
    assert rel(y, y_ref) > 1e-2


def test_a_state_with_other_strides():
    """A state that is a view with permuted strides (the kernel takes strides, not a layout)."""
    g, state, _ = make_inputs(2, 3, 16, False, torch.float32, 4)
    base = state.transpose(2, 3).contiguous().transpose(2, 3)           # same values, column-major tiles
    assert not base.is_contiguous()
    slope = torch.tensor([0.0, 0.2, 2.0], device=DEV)
    qkvu = next_qkvu(g, 2, 3, 16, torch.float32)
    y, new = gla_decode_step_triton(qkvu, base, slope, 4, None, "silu", EPS, in_place=True)
    y_ref, s_ref = gla_decode_step_reference(qkvu, state, slope, 4, None, "silu", EPS)
    assert new is base and rel(new, s_ref) <= SAME_FP32 and rel(y, y_ref) <= SAME_FP32
    y2, new2 = gla_decode_step_triton(qkvu, state, slope, 4, None, "silu", EPS)
    assert rel(new2, s_ref) <= SAME_FP32 and rel(y2, y_ref) <= SAME_FP32


def test_qkvu_rows_may_be_a_strided_view():
    """The model hands over qkvu[:, 0] of a [B, 1, 4 * hidden] projection; any row stride works."""
    g, state, theta = make_inputs(3, 2, 16, True, torch.float32, 6)
    wide = torch.randn(3, 4 * 32 + 8, generator=g).to(DEV)
    qkvu = wide[:, 4:4 + 4 * 32]
    slope = torch.tensor([0.1, 0.6], device=DEV)
    pos = torch.tensor([1, 2, 3], device=DEV)
    y, new = gla_decode_step_triton(qkvu, state, slope, pos, theta, "silu", EPS)
    y_ref, s_ref = gla_decode_step_reference(qkvu.contiguous(), state, slope, pos, theta, "silu", EPS)
    assert rel(y, y_ref) <= SAME_FP32 and rel(new, s_ref) <= SAME_FP32


def test_reference_is_the_models_composition():
    """gla_decode_step_reference (what the kernel is held to) equals GatedLinearAttention's own one-token path,
    float64 on CPU (where the model never takes the kernels), with LRPE and each activation and norm."""
    for act in ("silu", "1+elu", "none"):
        for norm in ("srms", "rms"):
            cfg = TransNormerConfig(vocab_size=11, d_model=24, n_layers=2, n_heads=3, glu_dim=8, qk_act=act,
                                    norm=norm, lrpe_layers=(0,))
            torch.manual_seed(1)
            gla = GatedLinearAttention(cfg, 0, decay_slopes(cfg)[0]).double()
            with torch.no_grad():
                gla.lrpe.theta.mul_(1 + torch.rand_like(gla.lrpe.theta))
            x = torch.randn(2, 1, 24, dtype=torch.float64)
            state = torch.randn(2, 3, 16, 8, dtype=torch.float64)
            for offset in (5, torch.tensor([3, 40])):
                with torch.no_grad():
                    want, want_state = gla(x, state, offset)
                    qkvu = gla.qkvu_proj(x)[:, 0]
                    eps = gla.out_norm.eps if norm == "srms" else None
                    y, got_state = gla_decode_step_reference(qkvu, state, gla.slope, offset, gla.lrpe.theta, act, eps)
                    if norm != "srms":
                        y = gla.out_norm(y) * qkvu.chunk(4, -1)[3]
                    got = gla.out_proj(y)[:, None]
                assert rel(got, want) < 1e-14 and rel(got_state, want_state) < 1e-14, (act, norm, offset)


def test_dispatch():
    qkvu = torch.randn(2, 4 * 32)
    state = torch.randn(2, 2, 16, 16)
    slope = torch.tensor([0.0, 0.5])
    assert not gla_decode_step_applies(qkvu, state) or CUDA
    y, s = gla_decode_step(qkvu, state, slope, 3, None, "silu", EPS)     # CPU: the reference
    y_ref, s_ref = gla_decode_step_reference(qkvu, state, slope, 3, None, "silu", EPS)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)
    assert not gla_decode_step_applies(qkvu.double(), state.double())
    assert not gla_decode_step_applies(qkvu[:, :-4], state)                  # width not 4 H E
    assert not gla_decode_step_applies(qkvu, torch.randn(2, 2, 32, 16))      # Dk = 2E without theta
    wide = torch.randn(2, 2, MAX_HEAD_DIM + 1, MAX_HEAD_DIM + 1)
    assert not gla_decode_step_applies(torch.randn(2, 4 * 2 * (MAX_HEAD_DIM + 1)), wide)
    if CUDA:
        c = dict(qkvu=qkvu.cuda(), state=state.cuda())
        assert gla_decode_step_applies(c["qkvu"], c["state"], torch.tensor([1, 2], device="cuda"))
        assert not gla_decode_step_applies(c["qkvu"], c["state"], torch.tensor([1, 2]))   # positions on the CPU
        assert not gla_decode_step_applies(c["qkvu"], state)
    else:
        gla_decode.interpret_on_cpu = True
        try:
            assert gla_decode_step_applies(qkvu, state, torch.tensor([1, 2]))
            assert not gla_decode_step_applies(qkvu, state, torch.tensor([1, 2, 3]))
            y2, s2 = gla_decode_step(qkvu, state, slope, 3, None, "silu", EPS)
            assert rel(y2, y_ref) <= SAME_FP32 and rel(s2, s_ref) <= SAME_FP32
        finally:
            gla_decode.interpret_on_cpu = False


def test_step_tiles_rule():
    """_step_tiles: the widest power-of-two BLOCK_V (16 to 64) whose state tile holds at most 16384 fp32 values and
    that still gives 128 programs; the 385M shape at 1/4/8/16 rows as the H200 sweeps chose (8 heads of 128)."""
    for rows_heads in (1, 8, 32, 64, 100, 128, 256, 4096):
        for head_dim in (12, 48, 64, 128, 256):
            for lrpe in (False, True):
                bv, warps = _step_tiles(rows_heads, head_dim, lrpe)
                block_e = max(16, 1 << (head_dim - 1).bit_length())
                values = block_e * (2 if lrpe else 1)           # state rows a program holds per column
                programs = lambda b: rows_heads * -(-head_dim // b)  # noqa: E731
                assert warps == 4 and 16 <= bv <= max(16, min(64, block_e)) and bv & (bv - 1) == 0
                assert bv == 16 or (values * bv <= 16384 and programs(bv) >= 128)
                wider = 2 * bv
                assert wider > min(64, block_e) or values * wider > 16384 or programs(wider) < 128
    assert [_step_tiles(8 * b, 128, False) for b in (1, 4, 8, 16)] == [(16, 4), (32, 4), (64, 4), (64, 4)]
    assert [_step_tiles(8 * b, 128, True) for b in (1, 4, 8, 16)] == [(16, 4), (32, 4), (64, 4), (64, 4)]
    with pytest.raises(ValueError, match="powers of two"):
        gla_decode_step_triton(torch.randn(2, 4 * 32, device=DEV), torch.randn(2, 2, 16, 16, device=DEV),
                               torch.zeros(2, device=DEV), tiles=(24, 4))


def test_clear_errors(monkeypatch):
    qkvu = torch.randn(2, 4 * 32, device=DEV)
    state = torch.randn(2, 2, 16, 16, device=DEV)
    slope = torch.zeros(2, device=DEV)
    with pytest.raises(TypeError, match="dtype"):
        gla_decode_step_triton(qkvu.double(), state, slope)
    with pytest.raises(TypeError, match="float32"):
        gla_decode_step_triton(qkvu, state.double(), slope)
    with pytest.raises(ValueError, match="shape"):
        gla_decode_step_triton(qkvu[:, :-4], state, slope)
    with pytest.raises(ValueError, match="slope"):
        gla_decode_step_triton(qkvu, state, torch.zeros(3, device=DEV))
    with pytest.raises(ValueError, match="theta"):
        gla_decode_step_triton(qkvu, torch.randn(2, 2, 32, 16, device=DEV), slope, 0, torch.ones(5, device=DEV))
    with pytest.raises(ValueError, match="activation"):
        gla_decode_step_triton(qkvu, state, slope, act="relu")
    with pytest.raises(ValueError, match="positions"):
        gla_decode_step_triton(qkvu, state, slope, torch.zeros(3, dtype=torch.long, device=DEV))
    with pytest.raises(ValueError, match="contiguous"):
        gla_decode_step_triton(torch.randn(4 * 32, 2, device=DEV).t(), state, slope)
    with pytest.raises(ValueError, match="norm_eps"):
        gla_decode_step_triton(qkvu, state, slope, norm_eps=-1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        gla_decode_step_triton(qkvu, state, [0.0, 0.0])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        gla_decode_step_triton(qkvu.cpu(), state.cpu(), slope.cpu())


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("lrpe", [False, True])
def test_gpu_385m_shape_bf16(B, lrpe):
    """The benchmark's shape: 8 heads of 128, bf16, far positions."""
    run_steps(B, 8, 128, lrpe, "silu", torch.bfloat16, decay_slopes(TransNormerConfig())[0].tolist(), "row", 4,
              True, seed=B)
    run_steps(B, 8, 128, lrpe, "silu", torch.float32, decay_slopes(TransNormerConfig())[23].tolist(), 123456, 2,
              False, seed=B + 1)


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_advances_state_and_positions():
    """Captured once, replayed: each replay reads the new qkvu and positions and updates the state in place, as
    the eager calls do (nothing of the first call frozen into the graph)."""
    B, H, E = 3, 4, 64
    g, state, theta = make_inputs(B, H, E, True, torch.bfloat16, 21)
    slope = torch.tensor([0.0, 0.1, 1.0, 5.0], device=DEV)
    pos = torch.tensor([0, 17, 4000], device=DEV)
    qkvu = torch.empty(B, 4 * H * E, device=DEV, dtype=torch.bfloat16)
    static_state, static_pos = state.clone(), pos.clone()
    qkvu.copy_(next_qkvu(g, B, H, E, torch.bfloat16))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                      # compile outside the capture
        gla_decode_step_triton(qkvu, static_state.clone(), slope, static_pos, theta, "silu", EPS, in_place=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, _ = gla_decode_step_triton(qkvu, static_state, slope, static_pos, theta, "silu", EPS, in_place=True)
        static_pos.add_(1)
    static_state.copy_(state)
    static_pos.copy_(pos)
    eager_state, eager_pos = state.clone(), pos.clone()
    for step in range(5):
        x = next_qkvu(g, B, H, E, torch.bfloat16)
        qkvu.copy_(x)
        graph.replay()
        y, eager_state = gla_decode_step_triton(x, eager_state, slope, eager_pos, theta, "silu", EPS)
        eager_pos = eager_pos + 1
        assert torch.equal(y_static, y), f"step {step}"
        assert torch.equal(static_state, eager_state), f"step {step}"
    assert static_pos.tolist() == eager_pos.tolist()


# ------------------------------------------------------------------------------------------------ compiled for sm_90
_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import tnllm_kernels.gla_decode.triton_step as m

target = GPUTarget("cuda", 90, 32)
for dt, lrpe, row_pos, act, pdl in (("bf16", True, True, 1, True), ("fp32", False, False, 2, False),
                                   ("fp16", True, False, 0, True)):
    ints = ["pos0", "H", "E", "HIDDEN", "stride_xb"] + [f"stride_{a}{b}" for a in "io" for b in "bhkv"]
    sig = dict(QKVU=f"*{dt}", S_IN="*fp32", S_OUT="*fp32", SLOPE="*fp32", POS="*i64" if row_pos else "*fp32",
               THETA=f"*{dt}", O=f"*{dt}", SSQ="*fp32", **{n: "i32" for n in ints},
               **{n: "constexpr" for n in ("ACT", "LRPE", "ROW_POS", "LIBDEVICE", "RNE", "BLOCK_E", "BLOCK_V", "PDL",
                                           "SSQ_ON")})
    consts = dict(ACT=act, LRPE=lrpe, ROW_POS=row_pos, LIBDEVICE=True, RNE=False, BLOCK_E=128,
                  PDL=pdl, SSQ_ON=pdl)
    consts["BLOCK_V"], num_warps = m._step_tiles(8, 128, lrpe)
    ptx = triton.compile(ASTSource(m._step_kernel, sig, consts), target=target,
                         options=dict(num_warps=num_warps)).asm["ptx"]
    assert "sin.approx" not in ptx and "cos.approx" not in ptx, (dt, lrpe)
    # with PDL: one wait, after the state tile's loads and before any other load or store
    assert ptx.count("griddepcontrol.wait") == int(pdl), (dt, lrpe, pdl)
    if pdl:
        before, after = ptx.split("griddepcontrol.wait")
        assert "ld.global" in before and "st.global" not in before, (dt, lrpe)
sig = dict(O="*bf16", U="*bf16", Y="*bf16", D="i32", stride_ub="i32", eps="fp32", RNE="constexpr", BLOCK_D="constexpr")
triton.compile(ASTSource(m._norm_gate_kernel, sig, dict(RNE=False, BLOCK_D=1024)), target=target,
               options=dict(num_warps=4))
print("compiled")
"""


@pytest.mark.skipif(CUDA, reason="on a GPU the kernels are compiled and run by the tests above")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The GPU path (libdevice, no interpreter rounding by hand) through Triton's NVIDIA compiler down to ptxas,
    which Triton's wheel ships: what the interpreter cannot check (typing of the compiled kernel, libdevice calls)
    is checked on a machine without a GPU too. In a subprocess: this process's kernels are interpreted."""
    import subprocess
    from pathlib import Path

    import triton
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
