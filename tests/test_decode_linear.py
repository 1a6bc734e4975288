"""tnllm_kernels.decode_linear (a decoding layer's GEMVs with the norm, gate, SGLU product and residual add folded
in, one Triton kernel each) against the PyTorch composition the model runs, and in the model's decode step.

Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernel module is
imported) at small shapes; with CUDA the same tests run on the GPU, plus those marked ``gpu`` (the 385M shapes). The
kernel has two forms of the product, which its tiles choose: broadcast fp32 sums (1-4 rows) and tl.dot (5 rows and
more); the tests run each with the GPU's tiles (_tiles) and with K over several tiles.
Two references: the composition in the kernel's dtype, whose roundings the kernel follows (so in fp32 they differ by
the order of fp32 sums only; in bf16 that order may flip a rounding now and then: at most a few steps of bf16 in a
few elements), and the composition in float64, against which the kernel may be off by no more than the composition
itself (x 1.5, plus fp32 summation order).
"""
import pytest
import torch

from triton_cpu import CUDA, DEV, compile_for_sm90, import_kernel_module

import_kernel_module("tnllm_kernels.gla_decode.triton_step")
import_kernel_module("tnllm_kernels.decode_linear.triton_gemv")
import tnllm_kernels.decode_linear as decode_linear_pkg  # noqa: E402
from tnllm_kernels.decode_linear import (MAX_ROWS, decode_linear, decode_linear_applies,  # noqa: E402
                                        decode_linear_reference)
import_kernel_module("tnllm_kernels.decode_linear.triton_embedding")
from tnllm_kernels.decode_linear import (decode_embedding, decode_embedding_applies,  # noqa: E402
                                        decode_embedding_reference)
from tnllm_kernels.decode_linear.triton_embedding import decode_embedding_triton  # noqa: E402
from tnllm_kernels.decode_linear.triton_gemv import _tiles, decode_linear_triton  # noqa: E402

EPS = 1e-6
ULP = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7}
# (norm, gate, glu, residual): the four uses in a block (QKVU; W_o; SGLU's pair; W_3) and the bare GEMV
VARIANTS = {"plain": (False, False, False, False), "qkvu": (True, False, False, False),
            "out_proj": (True, True, False, True), "sglu_pair": (True, False, True, False),
            "l3": (False, False, False, True)}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make(variant, m, n, k, dtype, seed):
    norm, gate, glu, residual = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * (3.0 if norm else 0.5)
    args = dict(x=x, weight=torch.randn(n, k, generator=g) * k ** -0.5)
    if norm:
        args["norm_eps"] = EPS
    if gate:
        args["gate"] = torch.randn(m, k, generator=g)
    if glu:
        args["weight2"] = torch.randn(n, k, generator=g) * k ** -0.5
    if residual:
        args["residual"] = torch.randn(m, n, generator=g)
    cast = {key: (v.to(DEV, dtype) if torch.is_tensor(v) else v) for key, v in args.items()}
    wide = {key: (v.to(DEV, torch.float64) if torch.is_tensor(v) else v) for key, v in cast.items()}
    return cast, wide


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """Let decode_linear dispatch to the (interpreted) kernel on CPU tensors."""
    if not CUDA:
        monkeypatch.setattr(decode_linear_pkg, "interpret_on_cpu", True)


def assert_like_the_composition(y, args, wide):
    """y against the composition in its dtype (fp32: the order of sums only; bf16: a rounding flipped now and then)
    and in float64 (no further off than the composition itself)."""
    same = decode_linear_reference(**args)
    y64 = decode_linear_reference(**wide)
    assert y.dtype == same.dtype and y.shape == same.shape and torch.isfinite(y).all()
    if y.dtype == torch.float32:
        assert rel(y, same) < 2e-6
    else:
        off = (y.double() - same.double()).abs()
        # a step of bf16 at the size of what was rounded: the output, and with a residual also the product, which
        # both round before the add; where the add cancels, a flipped rounding of the product is a step of the
        # product, many of the small sum (seen on an H200: 8 rows, W_3 + residual, 2^-8 off an output below 0.12)
        size = same.double().abs()
        if args.get("residual") is not None:
            size = torch.maximum(size, decode_linear_reference(**dict(args, residual=None)).double().abs())
        step = ULP[y.dtype] * size.clamp_min(1e-3)
        assert (off <= 4 * step).all(), off.max().item()
        assert (off > 0).double().mean().item() <= 0.05      # order-of-sums flips are rare, a wrong op changes most
    assert rel(y, y64) <= 1.5 * rel(same, y64) + 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("m", [1, 3, 8, 13, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_composition(variant, m, dtype, kernel_on_cpu):
    """Odd K (not a multiple of the K tile) and N (not a multiple of the column tile); 1 and 3 rows (padded) take
    the broadcast form, 8, 13 (padded to 16) and 16 tl.dot's (the kernel takes any count; the model hands it at most
    MAX_ROWS)."""
    args, wide = make(variant, m, 37, 150, dtype, seed=m)
    assert decode_linear_applies(**args) == (m <= MAX_ROWS)
    y = decode_linear_triton(**args, tiles=_tiles(m, 37, 150, variant == "sglu_pair"))    # the GPU's tiles
    assert_like_the_composition(y, args, wide)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,tiles", [(3, (4, 4, 32, 2, False)), (13, (16, 16, 32, 4, True))],
                         ids=["broadcast", "dot"])
def test_k_over_several_tiles(variant, dtype, m, tiles, kernel_on_cpu):
    """K of 150 in tiles of 32 (the GPU's tiles take the tests' K in one): the first tile, loaded before the wait for
    the previous kernel, then the loop's three whole ones and the last 22 wide; each form of the product."""
    args, wide = make(variant, m, 37, 150, dtype, seed=10 + m)
    assert_like_the_composition(decode_linear_triton(**args, tiles=tiles), args, wide)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,tiles", [(3, (4, 4, 32, 2, False, 2)), (13, (16, 16, 32, 4, True, 3)),
                                     (16, (16, 16, 32, 4, True, 9))], ids=["broadcast-2", "dot-3", "dot-9"])
def test_k_split_over_programs(variant, dtype, m, tiles, kernel_on_cpu):
    """K of 150 in tiles of 32 (5 tiles) split over 2 programs (3 + 2 tiles), 3 (2 + 2 + 1) and 9 (more than the
    tiles: 5 of one tile each), the last program of each column tile adding the parts: the same values as one
    program, twice in a row (the count of arrived programs is back at zero after each launch)."""
    from tnllm_kernels.decode_linear import triton_gemv
    args, wide = make(variant, m, 37, 150, dtype, seed=20 + m)
    for _ in range(2):
        y = decode_linear_triton(**args, tiles=tiles)
        assert_like_the_composition(y, args, wide)
        assert not triton_gemv._SPLIT_K_COUNTS[y.device].any()
    one = decode_linear_triton(**args, tiles=tiles[:5])
    if dtype == torch.float32:      # the same sums in another order
        assert rel(y, one) < 2e-6
    with pytest.raises(ValueError, match="split_k must be an int >= 1"):
        decode_linear_triton(**args, tiles=tiles[:5] + (0,))


def parts_of(x, parts):
    """x's rows' sums of squares in ``parts`` parts of (nearly) equal width, fp32 [B, parts], as a producer hands
    them on."""
    return torch.stack([c.float().square().sum(-1) for c in x.tensor_split(parts, dim=1)], dim=1).contiguous()


@pytest.mark.parametrize("variant", ["qkvu", "out_proj", "sglu_pair"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,tiles", [(3, None), (13, None), (13, (16, 16, 32, 4, True, 3))],
                         ids=["broadcast", "dot", "dot-split"])
def test_norm_from_sumsq_parts(variant, dtype, m, tiles, kernel_on_cpu):
    """x_sumsq: the norm from the rows' sums of squares in parts (5 parts here; 1 as the references give it) is the
    composition's; parts that are not x's (scaled by 4: the norm halves) give another output, so the kernel reads
    them and does not recompute the norm from x."""
    args, wide = make(variant, m, 37, 150, dtype, seed=30 + m)
    tiles = tiles or _tiles(m, 37, 150, variant == "sglu_pair")
    for parts in (5, 1):
        y = decode_linear_triton(**args, tiles=tiles, x_sumsq=parts_of(args["x"], parts))
        assert_like_the_composition(y, args, wide)
    wrong = decode_linear_triton(**args, tiles=tiles, x_sumsq=4 * parts_of(args["x"], 5))
    assert rel(wrong, decode_linear_reference(**args)) > 0.1


@pytest.mark.parametrize("variant", ["out_proj", "l3", "qkvu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,tiles", [(3, None), (13, None), (13, (16, 16, 32, 4, True, 3))],
                         ids=["broadcast", "dot", "dot-split"])
def test_with_sumsq_returns_the_outputs_sums_of_squares(variant, dtype, m, tiles, kernel_on_cpu):
    """with_sumsq: y as without it, and one part per column tile whose sum is y's rows' sums of squares (of the
    stored values, in fp32), also where K is split over programs (only the last of a column tile writes)."""
    args, _ = make(variant, m, 37, 150, dtype, seed=40 + m)
    tiles = tiles or _tiles(m, 37, 150, False)
    y, parts = decode_linear_triton(**args, tiles=tiles, with_sumsq=True)
    assert torch.equal(y, decode_linear_triton(**args, tiles=tiles))
    assert parts.dtype == torch.float32 and parts.shape == (m, -(-37 // tiles[1]))
    assert rel(parts.sum(1), y.float().square().sum(1)) < 2e-6


def test_sumsq_through_the_dispatch(kernel_on_cpu):
    """decode_linear passes x_sumsq and with_sumsq to the kernel, and the reference gives [B, 1] parts; x_sumsq that
    is not fp32 [B, parts] on x's device is refused with a message naming it."""
    args, _ = make("out_proj", 3, 24, 40, torch.float32, seed=7)
    y, parts = decode_linear(**args, x_sumsq=parts_of(args["x"], 2), with_sumsq=True)
    assert rel(y, decode_linear_reference(**args)) < 2e-6 and rel(parts.sum(1), y.square().sum(1)) < 2e-6
    wide = {key: args[key].repeat(MAX_ROWS, 1)[:MAX_ROWS + 1] for key in ("x", "gate", "residual")}
    wide = dict(args, **wide)       # more rows than the kernel takes: the reference's path
    y, parts = decode_linear(**wide, with_sumsq=True)
    assert parts.shape == (MAX_ROWS + 1, 1) and torch.equal(parts[:, 0], y.square().sum(1))
    for bad in (parts_of(args["x"], 2).double(), parts_of(args["x"], 2)[:2], parts_of(args["x"], 2).t(),
                parts_of(args["x"], 2)[:, 0]):
        with pytest.raises(ValueError, match="x_sumsq"):
            decode_linear(**args, x_sumsq=bad)


def test_tiles_choose_the_form():
    """_tiles: broadcast products up to 4 rows, tl.dot from 5 (rows padded to 16, every block at least 16; K split in 4
    for layers of fewer than 2048 outputs; at 1 and 3-4 rows in BLOCK_K-wide parts), on the 385M shapes and the tests';
    decode_linear_triton refuses tiles its forms cannot take."""
    for m in range(1, 17):
        for n, k, glu in [(4096, 1024, False), (1024, 1024, False), (2816, 1024, True), (1024, 2816, False),
                          (37, 150, False)]:
            block_m, block_n, block_k, _, dot, *split = _tiles(m, n, k, glu)
            assert dot == (m > 4) and block_m >= m
            assert not dot or min(block_m, block_n, block_k) >= 16
            # K split for tl.dot's narrow layers, and at 1 and 3-4 rows where K spans several of the broadcast's tiles
            assert split == ([4] if dot and n < 2048 else [3] if m in (3, 4) and k > 1024 else
                             [2] if m == 1 and k > 2048 else [])
    args, _ = make("l3", 13, 37, 150, torch.float32, seed=2)
    with pytest.raises(ValueError, match="at least 16"):
        decode_linear_triton(**args, tiles=(16, 8, 32, 4, True))
    with pytest.raises(ValueError, match="BLOCK_M 8 < 13"):
        decode_linear_triton(**args, tiles=(8, 16, 32, 4, True))


def test_every_operand_matters(kernel_on_cpu):
    """Each fused operand changes the result (a kernel that ignored the norm, gate, second matrix or residual would
    pass nothing above by accident: here each one is perturbed and the output must follow the reference)."""
    args, _ = make("out_proj", 2, 24, 40, torch.float32, seed=5)
    args2, _ = make("sglu_pair", 2, 24, 40, torch.float32, seed=6)
    for a in (args, args2):
        base = decode_linear_triton(**a)
        for key in [k for k in a if torch.is_tensor(a[k])]:
            bumped = dict(a, **{key: a[key] * 1.5 + 0.1})
            got = decode_linear_triton(**bumped)
            assert rel(got, base) > 1e-3, key
            assert rel(got, decode_linear_reference(**bumped)) < 2e-6, key
        no_norm = dict(a, norm_eps=None)
        assert rel(decode_linear_triton(**no_norm), decode_linear_reference(**no_norm)) < 2e-6


def test_dispatch_and_what_the_kernel_refuses(kernel_on_cpu):
    """Shapes or dtypes the kernel does not take go to the reference (same values), never to a wrong kernel call."""
    args, _ = make("l3", 3, 8, 16, torch.float32, seed=1)
    more_rows = dict(args, x=args["x"].repeat(MAX_ROWS + 1, 1)[:MAX_ROWS + 1],
                     residual=args["residual"].repeat(MAX_ROWS + 1, 1)[:MAX_ROWS + 1])
    assert decode_linear_applies(**args)
    assert not decode_linear_applies(**more_rows)
    assert not decode_linear_applies(**dict(args, weight=args["weight"].double()))
    assert not decode_linear_applies(**dict(args, residual=args["residual"][:, :4]))
    assert not decode_linear_applies(**dict(args, x=args["x"].t().contiguous().t()))      # rows not contiguous
    assert torch.equal(decode_linear(**more_rows), decode_linear_reference(**more_rows))    # the reference itself
    with torch.autocast(DEV, dtype=torch.bfloat16):
        assert not decode_linear_applies(**args)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("variant,n,k", [("qkvu", 4096, 1024), ("out_proj", 1024, 1024), ("sglu_pair", 2816, 1024),
                                         ("l3", 1024, 2816)])
@pytest.mark.parametrize("m", [1, 4, 8, 16])
def test_385m_shapes_in_bf16(variant, n, k, m):
    """The 385M model's four GEMVs of a block, bf16, batch 1 and 4 (broadcast form), 8 and 16 (tl.dot), against
    the same-dtype composition and fp64."""
    args, wide = make(variant, m, n, k, torch.bfloat16, seed=n + k + m)
    assert_like_the_composition(decode_linear_triton(**args), args, wide)


@pytest.mark.parametrize("dtype,batch", [(torch.float32, 3), (torch.bfloat16, 3), (torch.bfloat16, 5)])
@torch.no_grad()
def test_model_decode_with_the_fused_block_equals_the_composition(dtype, batch, kernel_on_cpu, monkeypatch):
    """The model's one-token step with every block fused (four GEMV kernels and the GLA step per layer) against the
    same model's composition, from one prefill, 5 greedy steps: logits and states to the dtype's rounding, the same
    tokens; the GEMVs ran four times per layer and step. Batch 3 (broadcast form) and 5 (tl.dot)."""
    import tnllm_kernels.decode_linear.triton_gemv as gemv
    import tnllm_kernels.gla_decode as gla_decode
    from tnllm_plugin import model as model_module
    from tnllm_plugin.model import TransNormerConfig, TransNormerLLM
    if not CUDA:
        monkeypatch.setattr(gla_decode, "interpret_on_cpu", True)
    torch.manual_seed(0)
    cfg = TransNormerConfig(vocab_size=97, d_model=48, n_layers=3, n_heads=3, glu_dim=80, lrpe_layers=(0,))
    model = TransNormerLLM(cfg).to(DEV, dtype).eval()
    calls = []
    real = gemv.decode_linear_triton
    monkeypatch.setattr(gemv, "decode_linear_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = torch.randint(3, 97, (batch, 11), generator=torch.Generator().manual_seed(1)).to(DEV)
    _, state = model(prompt, use_cache=True)
    fused_state = composed_state = state
    tok = prompt[:, -1:]
    # fp32: the order of sums (seen: 2e-7); bf16: a rounding flipped now and then, carried through the layers and
    # steps (seen: 0 for the first steps, then 2e-3), where a wrong operand is off by O(1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for _ in range(5):
        got, fused_state = model(tok, fused_state)
        with monkeypatch.context() as m:
            m.setattr(model_module, "decode_linear_applies", lambda *a, **k: False)
            want, composed_state = model(tok, composed_state)
        assert rel(got, want) < tol
        assert all(rel(a, b) < tol for a, b in zip(fused_state.kv, composed_state.kv))
        tok = want[:, -1:].argmax(-1)
    assert len(calls) == 4 * 3 * 5


@torch.no_grad()
def test_model_decode_hands_the_sums_on_and_keeps_hooks(kernel_on_cpu, monkeypatch):
    """Between fused blocks the model hands W_3's sums of squares to the next block's QKVU (every QKVU but the
    first gets parts), and a block with a forward hook goes through its forward: the hook runs once a step, that
    block's QKVU and the next one's read their rows themselves, and the logits are the same."""
    import tnllm_kernels.decode_linear.triton_gemv as gemv
    import tnllm_kernels.gla_decode as gla_decode
    from tnllm_plugin.model import TransNormerConfig, TransNormerLLM
    if not CUDA:
        monkeypatch.setattr(gla_decode, "interpret_on_cpu", True)
    torch.manual_seed(0)
    cfg = TransNormerConfig(vocab_size=97, d_model=48, n_layers=3, n_heads=3, glu_dim=80)
    model = TransNormerLLM(cfg).to(DEV).eval()
    qkvu_parts = []         # per QKVU call (N = 4 * d_model): whether it was given its input's parts
    real = gemv.decode_linear_triton

    def spy(x, weight, *a, **k):
        if weight.shape[0] == 4 * cfg.d_model:
            qkvu_parts.append(k.get("x_sumsq") is not None)
        return real(x, weight, *a, **k)
    monkeypatch.setattr(gemv, "decode_linear_triton", spy)
    prompt = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(2)).to(DEV)
    _, state = model(prompt, use_cache=True)
    tok = prompt[:, -1:]
    plain, _ = model(tok, state)
    assert qkvu_parts == [False, True, True]
    seen = []
    handle = model.layers[1].register_forward_hook(lambda *_: seen.append(1))
    try:
        qkvu_parts.clear()
        hooked, _ = model(tok, state)
    finally:
        handle.remove()
    assert seen == [1] and qkvu_parts == [False, False, False]     # the hooked block hands nothing on either
    assert rel(hooked, plain) < 1e-6


SM90_SHARED = 227 * 1024     # bytes of shared memory a block may have on an H100/H200


def test_kernel_compiles_for_sm90_without_a_gpu():
    """The GPU variants the kernel takes compiled for sm_90, with the 385M shapes' alignment (what the launcher
    specializes on): what the CPU interpreter cannot check (there tl.dot runs on fp32 operands; on the GPU on bf16
    or fp16 ones, with the GPU's shape rules, staged through shared memory). The GPU's tiles of each form (1 and 3
    rows broadcast; 8, 13 and 16 tl.dot) in bf16, fp16 and fp32, within an H200's shared memory, the widest dot tiles
    that fit and the narrowest, the broadcast form at 8 rows that the tile sweep still times, and K split over
    programs (dot and broadcast, with SGLU's pair). With PDL (programmatic dependent launch, what the kernel takes on
    sm_90) the PTX waits once for the previous kernel; without it, never."""
    n, k = 1024, 2816
    cases = []
    for m, dt, variant, pdl, tiles in [
            (1, "bf16", "out_proj", True, None), (3, "bf16", "sglu_pair", True, None), (1, "fp16", "l3", True, None),
            (8, "bf16", "out_proj", False, (8, 2, 512, 4, False)),
            (16, "bf16", "out_proj", True, None), (16, "bf16", "sglu_pair", False, None),
            (13, "fp16", "l3", True, None), (8, "fp32", "qkvu", False, None),
            (16, "bf16", "sglu_pair", True, (16, 16, 1024, 8, True)),
            (16, "bf16", "qkvu", True, (16, 64, 512, 8, True)),
            (16, "bf16", "qkvu", True, (16, 16, 128, 2, True)),
            (16, "bf16", "out_proj", True, (16, 16, 256, 4, True, 4)),
            (16, "bf16", "sglu_pair", True, (16, 16, 256, 4, True, 2)),
            (1, "bf16", "l3", True, (1, 8, 1024, 4, False, 2))]:
        norm, gate, glu, residual = VARIANTS[variant]
        block_m, block_n, block_k, warps, dot, *split = tiles or _tiles(m, n, k, glu)
        sig = dict(X=f"*{dt}", G=f"*{dt}", W1=f"*{dt}", W2=f"*{dt}", R=f"*{dt}", Y=f"*{dt}", WS="*fp32", CNT="*i32",
                   SSQ_IN="*fp32", SSQ_OUT="*fp32", M="i32", N="i32", K="i32", K_SPLIT="i32", SSQ_IN_PARTS="i32",
                   stride_x="i32", stride_g="i32", stride_w1="i32", stride_w2="i32", stride_r="i32", stride_y="i32",
                   eps="fp32", **{c: "constexpr" for c in ("NORM", "GATE", "GLU", "RESIDUAL", "RNE", "BLOCK_M",
                                                           "BLOCK_N", "BLOCK_K", "DOT", "F32_DOT", "SPLIT_K", "PDL",
                                                           "SSQ_IN_BLOCK", "SSQ_OUT_ON", "PREFETCH")})
        # the block's sums of squares in parts (the model's: W_o and SGLU read them, W_o and W_3 write them) in
        # half of the cases
        ssq = len(cases) % 2 == 0
        consts = dict(NORM=norm, GATE=gate, GLU=glu, RESIDUAL=residual, RNE=False, BLOCK_M=block_m, BLOCK_N=block_n,
                      BLOCK_K=block_k, DOT=dot, F32_DOT=dt == "fp32", SPLIT_K=split[0] if split else 1, PDL=pdl,
                      SSQ_IN_BLOCK=32 if ssq and norm else 0, SSQ_OUT_ON=ssq and residual,
                      PREFETCH=pdl and dot and block_k < k)      # as the launcher sets it: K over several tiles
        cases.append((sig, consts, warps))
    assert sum(consts["DOT"] for _, consts, _ in cases) == 9
    # 3 given, 7 of _tiles's: tl.dot's at N = 1024, the broadcast form's at 1 and 3 rows (K = 2816 in parts)
    assert sum(consts["SPLIT_K"] > 1 for _, consts, _ in cases) == 10
    aligned = ("X", "G", "W1", "W2", "R", "Y", "WS", "CNT", "SSQ_IN", "SSQ_OUT", "K", "K_SPLIT", "stride_x", "stride_g",
               "stride_w1", "stride_w2", "stride_r", "stride_y")
    waits = compile_for_sm90("tnllm_kernels.decode_linear.triton_gemv", "_gemv_kernel", cases, divisible=aligned,
                             max_shared=SM90_SHARED)
    assert waits == [1 if consts["PDL"] else 0 for _, consts, _ in cases]
    # the L2 prefetch of the rest of a program's weights, where the launcher asks for it (tl.dot's 4 warps hold a
    # 16 x 32 x 256 tile's lines one per thread; at BLOCK_K 32 one per column)
    assert sum(consts["PREFETCH"] for _, consts, _ in cases) == 7
    some = [c for c in cases if c[1]["PREFETCH"]][:2] + [c for c in cases if not c[1]["PREFETCH"]][:1]
    narrow = (some[0][0], dict(some[0][1], BLOCK_N=16, BLOCK_K=32), 4)
    prefetches = compile_for_sm90("tnllm_kernels.decode_linear.triton_gemv", "_gemv_kernel", some + [narrow],
                                  count_in_ptx="prefetch.global.L2", divisible=aligned)
    assert all(p > 0 for p in prefetches[:2]) and prefetches[2] == 0 and prefetches[3] > 0, prefetches


# ------------------------------------------------------------------------------------------------ the embedding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("scale", [1.0, 32.0, 1000 ** 0.5])
def test_embedding_equals_the_composition(dtype, rows, scale, kernel_on_cpu):
    """decode_embedding: the rows times the scale, rounded once as the composition's multiply rounds: equal bit for bit,
    int64 and int32 ids, a width over two column tiles (2100 > 2048) and an odd one; sqrt(1000) rounds differently
    from a power of two."""
    g = torch.Generator().manual_seed(rows)
    for vocab, d in [(50, 37), (7, 2100)]:
        weight = (torch.randn(vocab, d, generator=g) * 3).to(DEV, dtype)
        tokens = torch.randint(0, vocab, (rows, 1), generator=g).to(DEV)
        assert decode_embedding_applies(weight, tokens)
        want = decode_embedding_reference(weight, tokens, scale)
        for ids in (tokens, tokens.int()):
            got = decode_embedding_triton(weight, ids, scale)
            assert got.dtype == dtype and got.shape == (rows, 1, d) and torch.equal(got, want)
        if scale != 1.0:
            assert not torch.equal(want, decode_embedding_reference(weight, tokens))    # the scale matters


def test_embedding_ids_outside_the_vocabulary_give_nan(kernel_on_cpu):
    """An id the model's check would refuse (a replayed graph does not check) gives a row of NaN, not another row."""
    weight = torch.randn(10, 24).to(DEV)
    got = decode_embedding_triton(weight, torch.tensor([[3], [10], [-1]], device=DEV), 2.0)
    assert torch.equal(got[0, 0], weight[3] * 2.0)
    assert torch.isnan(got[1:]).all()


def test_embedding_dispatch(kernel_on_cpu):
    """Only [B, 1] ids of at most MAX_ROWS rows take the kernel; anything else gets the composition itself."""
    weight = torch.randn(10, 8).to(DEV)
    ids = torch.randint(0, 10, (3, 1)).to(DEV)
    assert decode_embedding_applies(weight, ids)
    for bad in (ids.view(1, 3), ids.repeat(MAX_ROWS, 1), ids.float()):
        assert not decode_embedding_applies(weight, bad)
    assert not decode_embedding_applies(weight.double(), ids)
    assert not decode_embedding_applies(weight.t().contiguous().t(), ids)
    many = ids.repeat(MAX_ROWS, 1)
    assert torch.equal(decode_embedding(weight, many, 3.0), decode_embedding_reference(weight, many, 3.0))


@torch.no_grad()
def test_model_embeds_a_decoding_token_with_the_kernel(kernel_on_cpu, monkeypatch):
    """TransNormerLLM._embed: the kernel for one token a row without gradients (the same values as the composition),
    the composition for a prompt, with gradients, or with a hook on the embedding (finite.py's checks see its
    output)."""
    from tnllm_kernels import decode_linear as pkg
    from tnllm_plugin import model as model_module
    from tnllm_plugin.model import TransNormerConfig, TransNormerLLM
    calls = []
    real = model_module.decode_embedding
    monkeypatch.setattr(model_module, "decode_embedding", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(pkg, "interpret_on_cpu", True)
    model = TransNormerLLM(TransNormerConfig(vocab_size=97, d_model=48, n_layers=1, n_heads=3, glu_dim=80)).to(DEV)
    tok = torch.randint(0, 97, (4, 1)).to(DEV)
    want = model.embed_tokens(tok) * model.embed_scale
    assert model.embed_scale != 1.0 and torch.equal(model._embed(tok), want) and len(calls) == 1
    model._embed(tok.repeat(1, 3))
    with torch.enable_grad():
        assert model._embed(tok).requires_grad
    handle = model.embed_tokens.register_forward_hook(lambda *a: None)
    model._embed(tok)
    handle.remove()
    assert len(calls) == 1


def test_embedding_compiles_for_sm90_without_a_gpu():
    """The embedding kernel for sm_90 in bf16, fp16 and fp32, with and without PDL: it waits once for the previous
    kernel before it reads the ids."""
    cases = []
    for dt, pdl in [("bf16", True), ("fp16", True), ("fp32", False)]:
        sig = dict(W=f"*{dt}", T="*i64", Y=f"*{dt}", V="i32", D="i32", stride_w="i32", stride_t="i32",
                   stride_y="i32", scale="fp32", RNE="constexpr", BLOCK_D="constexpr", PDL="constexpr")
        cases.append((sig, dict(RNE=False, BLOCK_D=1024, PDL=pdl), 4))
    waits = compile_for_sm90("tnllm_kernels.decode_linear.triton_embedding", "_embedding_kernel", cases,
                             divisible=("W", "Y", "D", "stride_w", "stride_y"), max_shared=SM90_SHARED)
    assert waits == [1, 1, 0]
