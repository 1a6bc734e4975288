"""The Triton lightning-attention kernel (forward and backward) against the float64 quadratic reference.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before the kernel module
is imported) at small shapes; with CUDA the same tests run on the GPU, and the tests marked ``gpu`` add large
shapes and a comparison of our error with flash-linear-attention's ``chunk_simple_gla`` on the same inputs.
Error measure: ||out - ref|| / ||ref||.
"""
import os

import pytest
import torch

from triton_cpu import CUDA, DEV, import_kernel_module

import_kernel_module("tnllm_kernels.lightning_attention.triton_chunk")
from tnllm_kernels.lightning_attention.chunk import lightning_attention_chunk  # noqa: E402
from tnllm_kernels.lightning_attention.naive import lightning_attention_naive  # noqa: E402
from tnllm_kernels.lightning_attention.triton_chunk import MAX_DK, MAX_DV, lightning_attention_triton  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _inputs(B, N, H, DK, DV, dtype, slopes, seed, with_s0=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.silu(torch.randn(B, N, H, DK, generator=g)) * 0.5
    k = torch.nn.functional.silu(torch.randn(B, N, H, DK, generator=g)) * 0.5
    v = torch.randn(B, N, H, DV, generator=g)
    s0 = torch.randn(B, H, DK, DV, generator=g) if with_s0 else None
    do = torch.randn(B, N, H, DV, generator=g)
    dht = torch.randn(B, H, DK, DV, generator=g)
    slope = torch.tensor(slopes, dtype=torch.float32)
    cast = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    return ([cast(t).to(dtype) for t in (q, k, v)], cast(slope), cast(s0), cast(do), cast(dht))


def _leaf(t):
    """A leaf copy of t with t's strides (clone() makes views of a wider tensor contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t).requires_grad_()


def _run_ours(qkv, slope, s0, do, dht, **kw):
    qkv = [_leaf(t.detach()) for t in qkv]
    s0r = s0.detach().clone().requires_grad_() if s0 is not None else None
    o, fin = lightning_attention_triton(*qkv, slope, s0r, **kw)
    loss = (o.float() * do).sum() + (fin * dht).sum()
    loss.backward()
    return o, fin, [t.grad for t in qkv], (s0r.grad if s0r is not None else None)


def _run_ref(qkv, slope, s0, do, dht, fn=lightning_attention_naive):
    qkv = [t.detach().double().requires_grad_() for t in qkv]
    s0r = s0.detach().double().requires_grad_() if s0 is not None else None
    o, fin = fn(*qkv, slope.double(), s0r)
    ((o * do.double()).sum() + (fin * dht.double()).sum()).backward()
    return o, fin, [t.grad for t in qkv], (s0r.grad if s0r is not None else None)


def _compare(ours, ref, tol, label=""):
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    got = [ours[0], ours[1], *ours[2], ours[3]]
    exp = [ref[0], ref[1], *ref[2], ref[3]]
    errs = {}
    for n, a, b in zip(names, got, exp):
        if b is None:
            assert a is None, f"{label}{n}: expected no gradient"
            continue
        assert a is not None, f"{label}{n} missing"
        assert a.shape == b.shape, f"{label}{n}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.isfinite(a).all(), f"{label}{n} has non-finite values"
        errs[n] = rel(a, b)
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"{label}relative errors over {tol}: {bad} (all: {errs})"
    return errs


# (B, N, H, Dk, Dv, chunk, segments, dtype, slopes, initial state)
CASES = [
    (2, 77, 2, 32, 16, 16, None, torch.float32, [0.0, 0.3], True),         # odd N, batch 2, Dk != Dv, lambda = 1
    (1, 100, 3, 16, 32, 16, 3, torch.float32, [0.0, 0.05, 1.0], True),    # several segments (pre-pass + scan)
    (2, 77, 2, 32, 16, 16, None, torch.bfloat16, [0.0, 0.3], True),
    (1, 90, 2, 32, 32, 32, 2, torch.bfloat16, [0.02, 0.5], False),        # no initial state, 2 segments
    (1, 37, 2, 200, 72, 16, 2, torch.float32, [0.0, 0.1], True),          # Dk > 128 (LRPE-doubled): Dv tiles
    (2, 45, 2, 128, 128, 16, 2, torch.bfloat16, [0.0, 0.2], True),        # heads of 128: two tiles of 64 a walk
    (1, 20, 1, 16, 16, 16, None, torch.float16, [0.2], True),
    (1, 1, 1, 16, 16, 16, None, torch.float32, [0.7], True),              # a single token
    # the model's default chunk (64) over heads of 16 (32 with LRPE) and 3 heads, shorter than one chunk: the
    # shapes of the tiny model whose first CUDA forward died with an illegal memory access on an H200 (2026-11-29)
    (3, 11, 3, 32, 16, 64, None, torch.float32, [0.0, 0.1, 0.5], False),
    (3, 11, 3, 16, 16, 64, None, torch.bfloat16, [0.0, 0.1, 0.5], False),
    (3, 11, 3, 16, 16, 64, None, torch.float32, [0.0, 0.1, 0.5], True),    # the crash: 16 x 16 fp32 at 8 warps
]


@pytest.mark.parametrize("B,N,H,DK,DV,C,NSEG,dtype,slopes,with_s0", CASES)
def test_matches_float64_reference(B, N, H, DK, DV, C, NSEG, dtype, slopes, with_s0):
    qkv, slope, s0, do, dht = _inputs(B, N, H, DK, DV, dtype, slopes, seed=N * 7 + DK, with_s0=with_s0)
    ours = _run_ours(qkv, slope, s0, do, dht, chunk_size=C, num_segments=NSEG)
    ref = _run_ref(qkv, slope, s0, do, dht)
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    _compare(ours, ref, TOL[dtype])


def test_segments_and_chunk_size_do_not_change_the_result():
    qkv, slope, s0, do, dht = _inputs(1, 70, 2, 16, 16, torch.float32, [0.0, 0.2], seed=3)
    base = _run_ours(qkv, slope, s0, do, dht, chunk_size=16, num_segments=1)
    for kw in (dict(chunk_size=16, num_segments=5), dict(chunk_size=32, num_segments=2)):
        other = _run_ours(qkv, slope, s0, do, dht, **kw)
        _compare(other, base, 1e-5, label=f"{kw}: ")


@pytest.mark.parametrize("N,segments,pieces", [(100, 3, 2), (150, 2, 4), (150, 2, 99), (77, 2, 3), (300, 2, 10)])
def test_pre_pass_in_pieces(N, segments, pieces, monkeypatch):
    """The pre-pass cuts each segment into pieces (on a GPU when its segments alone would leave SMs idle; forced
    here): uneven and empty pieces (150 tokens, chunks of 16, 2 segments of 5 chunks in 4 pieces of 2: the last
    empty) and a partial last chunk, forward and backward, against float64 and against the unsplit pre-pass."""
    import functools
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    qkv, slope, s0, do, dht = _inputs(2, N, 2, 16, 32, torch.float32, [0.0, 0.15], seed=N + pieces)
    whole = _run_ours(qkv, slope, s0, do, dht, chunk_size=16, num_segments=segments)
    plan = tc._plan
    monkeypatch.setattr(tc, "_plan", functools.partial(plan, pre_splits=pieces))
    assert tc._plan(2, N, 2, 16, 32, 16, 4, segments)["SPLITS"] == min(pieces, plan(2, N, 2, 16, 32, 16, 4,
                                                                                      segments)["CPS"]) > 1
    split = _run_ours(qkv, slope, s0, do, dht, chunk_size=16, num_segments=segments)
    _compare(split, _run_ref(qkv, slope, s0, do, dht), TOL[torch.float32])
    _compare(split, whole, 1e-5, label=f"{pieces} pieces vs 1: ")


@pytest.mark.parametrize("pieces", [1, 3])
def test_steep_decays_across_segments_and_pieces(pieces, monkeypatch):
    """Decays steep enough that the pre-pass skips most of each segment (slopes 4 and 12: tokens more than 28 and
    10 from the segment's edge have a decay below 2^-160), beside slopes 0 and 0.5 that it must read whole: three
    segments of 7 chunks, in one piece and in three, forward and backward with states, against float64."""
    import functools
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    monkeypatch.setattr(tc, "_plan", functools.partial(tc._plan, pre_splits=pieces))
    qkv, slope, s0, do, dht = _inputs(2, 300, 4, 16, 32, torch.float32, [0.0, 0.5, 4.0, 12.0], seed=41 + pieces)
    _compare(_run_ours(qkv, slope, s0, do, dht, chunk_size=16, num_segments=3), _run_ref(qkv, slope, s0, do, dht),
             TOL[torch.float32])


def test_pieces_that_reach_nothing_are_neither_written_nor_read(monkeypatch):
    """The pre-pass leaves a piece none of whose chunks reaches its segment's edge unwritten, and the scan does not
    read it: with the pre-pass's buffer filled with NaN, the steep heads (slopes 4 and 12, three segments of 7 chunks
    in 3 pieces) leave NaN in it and the results still match float64, forward and backward with states."""
    import functools
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    buffers = []

    def nan_buffer(shape, device):
        buffers.append(torch.full(shape, float("nan"), dtype=torch.float32, device=device))
        return buffers[-1]

    monkeypatch.setattr(tc, "_pieces_buffer", nan_buffer)
    monkeypatch.setattr(tc, "_plan", functools.partial(tc._plan, pre_splits=3))
    qkv, slope, s0, do, dht = _inputs(2, 300, 4, 16, 32, torch.float32, [0.0, 0.5, 4.0, 12.0], seed=43)
    _compare(_run_ours(qkv, slope, s0, do, dht, chunk_size=16, num_segments=3), _run_ref(qkv, slope, s0, do, dht),
             TOL[torch.float32])
    assert len(buffers) == 2                     # forward (k, v) and backward (q, dO)
    # [B*H, pieces, Dk, Dv]. Heads 0 and 1 reach the edge from every token, so they leave only empty pieces
    # unwritten: none forward, the last backward (segment 2's 5 chunks in pieces of 3, 2 and 0). The steep heads more.
    for buf, empty in zip(buffers, ([False] * 6, [False] * 5 + [True])):
        unwritten = buf.isnan().view(2, 4, 6, -1).all(-1)
        assert (unwritten[:, :2] == torch.tensor(empty)).all()
        assert (unwritten[:, 2:].sum(-1) > sum(empty)).all()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("pieces", [1, 3])
def test_pre_pass_skips_tokens_whose_decay_to_the_edge_is_zero_in_fp32(reverse, pieces):
    """The pre-pass does not read a token whose decay to its segment's edge is below 2^-160 (ZERO_DECAY_LOG2): NaN
    there (slope 12, 64 tokens from the edge) leaves the segment states finite and equal to float64 with those
    tokens taken as zero. It does read a token whose decay is above that however small: 1e20 at 111 tokens from
    the edge at slope 0.5 (a decay of 8e-25) shows in the state. Forward: k, v -> the state entering each segment;
    backward: q, dO -> dS at each segment's end. 300 tokens, chunks of 16, three segments of 112 tokens, each in
    one piece or in three (pieces wholly skipped, partly, or not at all)."""
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    (q, k, v), slope, _, do, _ = _inputs(1, 300, 4, 16, 32, torch.float32, [0.0, 0.5, 4.0, 12.0], seed=7)
    a, b = (q, do) if reverse else (k, v)
    a = a.clone()
    starts = (112, 224)                          # the first tokens of segments 1 and 2
    # tokens 49 or more from their segment's edge (a decay of 2^-848 at slope 12), and one 111 from it
    far = [range(s + 48, min(s + 112, 300)) if reverse else range(s - 112, s - 48) for s in starts]
    big = starts[0] + 110 if reverse else 0
    a[0, big, 1] = 1e20
    P = tc._plan(1, 300, 4, 16, 32, 16, tc._num_sms(a.device), 3, pieces)
    assert (P["NSEG"], P["CPS"], P["SPLITS"]) == (3, 7, pieces)
    buf, _, _ = tc._segment_states(a, b, slope, None, P, 16, tc._dot_prec(a.dtype), reverse)
    exact = a.double().clone()
    for r in far:
        exact[0, list(r), 3] = 0.0
        a[0, list(r), 3] = float("nan")
    buf_nan, _, _ = tc._segment_states(a, b, slope, None, P, 16, tc._dot_prec(a.dtype), reverse)
    lam = torch.exp(-slope.double())
    t = torch.arange(300, dtype=torch.float64)
    for s, edge in enumerate((0, *starts)):      # forward: the state entering segment s; reverse: dS at its end
        if reverse:
            if s == 2:
                continue
            nxt = starts[s]
            w = torch.where(t >= nxt, lam[:, None] ** (t - nxt + 1), 0.0)           # [H, N]
        else:
            w = torch.where(t < edge, lam[:, None] ** (edge - 1 - t), 0.0)
        ref = torch.einsum("hn,nhk,nhv->hkv", w, exact[0], b[0].double())
        for got in (buf, buf_nan):
            assert torch.isfinite(got[:, s]).all(), (s, reverse)
            err = rel(got[:, s].view(4, 16, 32), ref)
            assert err < 1e-5, (s, reverse, err)


@pytest.mark.parametrize("B,N,segments,triton_walks", [(32, 1024, 1, 1), (8, 4096, 1, 1), (4, 8192, 1, 2),
                                                       (2, 16384, 4, 4), (1, 32768, 8, 8), (1, 100000, 8, 8),
                                                       (3, 8192, 1, 2), (1, 20000, 8, 8)])
def test_segments_chosen_for_an_h200(B, N, segments, triton_walks):
    """The plan's segments for 132 SMs, heads of 128 (two Dv tiles a walk), 16 heads. Where the Gluon walks run
    (one_an_sm): one program an SM where that takes at most two segments (the pre-pass, which every segment but the
    last costs, then reads half or less of the tokens, or none), else enough for two an SM; the rows of the
    attention table measured either way (benchmarks/RESULTS.md, twentieth session). Where that is two segments
    (N = 16384), four, walked by programs holding both Z tiles, 128 of them (twenty-second session); not where
    those would leave SMs idle (24 heads: 96 programs). The Triton walks, not measured so, keep two an SM. A pure
    function: no GPU needed."""
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    assert tc._plan(B, N, 16, 128, 128, 64, 132, one_an_sm=True)["NSEG"] == segments
    assert tc._plan(1, N, 24, 128, 128, 64, 132, one_an_sm=True)["NSEG"] == min(2, N // 64)
    assert tc._plan(B, N, 16, 128, 128, 64, 132)["NSEG"] == triton_walks
    assert tc._plan(B, N, 16, 128, 128, 64, 132, num_segments=3, one_an_sm=True)["NSEG"] == 3   # an explicit count wins


@pytest.mark.parametrize("B,N,one_an_sm,pieces,chunks", [(2, 16384, True, 4, 16), (1, 32768, True, 4, 16),
                                                          (1, 20000, True, 4, 10), (4, 8192, False, 8, 8)])
def test_pre_pass_pieces_chosen_for_an_h200(B, N, one_an_sm, pieces, chunks):
    """The pre-pass's pieces a segment for 132 SMs, heads of 128, 16 heads: twice the walks' two slots an SM over
    its B*H*(segments - 1) programs (with the skip, the gentle heads' pieces set its length; twenty-third session),
    each of `chunks` chunks of 64. Gluon-walk plans (one_an_sm), and the Triton walks' two segments at 8192. A pure
    function: no GPU needed."""
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    P = tc._plan(B, N, 16, 128, 128, 64, 132, one_an_sm=one_an_sm)
    assert (P["SPLITS"], P["CPSS"]) == (pieces, chunks)


def test_heads_the_gluon_walks_take_plan_one_program_an_sm(monkeypatch):
    """Where gluon_walk.takes_heads says the Gluon walks take these heads, the forward plans with one_an_sm, and
    the backward walks the same segments. On CPU through a stand-in for gluon_walk that takes the heads for the
    plan but leaves every walk to the Triton kernel: 2 x 1 heads of one Dv tile, 8 chunks, on 4 "SMs" are 2
    segments with one_an_sm, 4 without."""
    import types
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    stand_in = types.SimpleNamespace(takes_heads=lambda *args: True, applies=lambda *args: False,
                                     pair_applies=lambda *args: False)
    monkeypatch.setattr(tc, "_gluon_walk", stand_in)
    plan, planned = tc._plan, []

    def recorded(*args, **kwargs):
        P = plan(*args, **kwargs)
        planned.append(P["NSEG"])
        return P
    monkeypatch.setattr(tc, "_plan", recorded)
    qkv, slope, s0, do, dht = _inputs(2, 125, 1, 16, 16, torch.float32, [0.1], seed=23)
    assert plan(2, 125, 1, 16, 16, 16, 4)["NSEG"] == 4 and plan(2, 125, 1, 16, 16, 16, 4, one_an_sm=True)["NSEG"] == 2
    ours = _run_ours(qkv, slope, s0, do, dht, chunk_size=16)
    assert planned == [2, 2], planned         # forward, backward
    _compare(ours, _run_ref(qkv, slope, s0, do, dht), TOL[torch.float32])


def test_gluon_walks_hold_both_tiles_where_those_programs_fill_the_gpu(monkeypatch):
    """The Gluon walks run the o and dq walks as one program holding both Z tiles (one an SM) only where
    batch*heads*segments of them fill the SMs, less 5%: on an H200's 132 SMs, 512 (N = 1024) and 128 (N = 16384
    and 32768) do, 64 (N = 8192, one segment) do not. And _walk asks for them by that rule: on CPU through a
    stand-in for gluon_walk that records each walk's both_tiles, 2 x 2 heads x 2 segments on 8 and on 9 "SMs"."""
    import types
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    assert tc._both_tiles_fill(512, 132) and tc._both_tiles_fill(128, 132) and tc._both_tiles_fill(126, 132)
    assert not tc._both_tiles_fill(125, 132) and not tc._both_tiles_fill(64, 132)
    asked = []
    stand_in = types.SimpleNamespace(takes_heads=lambda *args: False, applies=lambda *args: True,
                                     walk=lambda *args, both_tiles: asked.append(both_tiles))
    monkeypatch.setattr(tc, "_gluon_walk", stand_in)
    qkv, slope, s0, do, dht = _inputs(2, 64, 2, 16, 16, torch.float32, [0.1, 0.2], seed=5)
    for sms, expected in ((8, True), (9, False)):
        monkeypatch.setattr(tc, "_num_sms", lambda device, sms=sms: sms)
        tc._fwd(*qkv, slope, s0, False, 16, 2)
        assert asked == [expected], (sms, asked)
        asked.clear()


def test_backward_walks_the_segments_the_forward_made(monkeypatch):
    """The backward pass reads the segment states the forward pass stored, so it must cut the sequence the same
    way whatever it would plan itself (a plan can depend on more than shapes, e.g. TNLLM_GLUON_WALKS on a GPU):
    here the plan's default changes between the two passes, and the gradients must still match float64."""
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    qkv, slope, s0, do, dht = _inputs(2, 90, 1, 16, 16, torch.float32, [0.1], seed=21)
    plan = tc._plan
    assert plan(2, 90, 1, 16, 16, 16, tc._num_sms(qkv[0].device))["NSEG"] == 3      # on CPU: 4 "SMs"
    leaves = [_leaf(t) for t in qkv]
    s0r = s0.clone().requires_grad_()
    o, fin = lightning_attention_triton(*leaves, slope, s0r, chunk_size=16)

    def other_default(B, N, H, DK, DV, C, sms, num_segments=None, *rest, **kw):
        return plan(B, N, H, DK, DV, C, sms, 2 if num_segments is None else num_segments, *rest, **kw)
    monkeypatch.setattr(tc, "_plan", other_default)
    ((o.float() * do).sum() + (fin * dht).sum()).backward()
    _compare((o, fin, [t.grad for t in leaves], s0r.grad), _run_ref(qkv, slope, s0, do, dht), TOL[torch.float32])


def test_launches_past_the_first_skip_the_autotuner_with_its_config():
    """_launch keeps the config the autotuner chose per constexprs and dtypes; _force_configs (the tests' way to
    run every config) drops what it kept, so a forced config is the one that runs."""
    import triton
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    qkv, slope, s0, do, dht = _inputs(1, 40, 2, 16, 16, torch.float32, [0.0, 0.3], seed=11)
    try:
        tc._force_configs([triton.Config({}, num_warps=2, num_stages=1)])
        assert not tc._TUNED
        _run_ours(qkv, slope, s0, do, dht, chunk_size=16, num_segments=2)
        assert tc._TUNED and all(o["num_warps"] == 2 for o in tc._TUNED.values())
        tc._force_configs([triton.Config({}, num_warps=1, num_stages=1)])
        assert not tc._TUNED
        _run_ours(qkv, slope, s0, do, dht, chunk_size=16, num_segments=2)
        assert tc._TUNED and all(o["num_warps"] == 1 for o in tc._TUNED.values())
    finally:
        tc._force_configs(None)


def test_no_final_state_and_strided_inputs():
    """Views from a fused projection (non-contiguous along N and H) work without copies, through the pre-pass and
    scan too (two segments); output_final_state=False returns None and the gradients still flow to q, k, v."""
    B, N, H, D = 2, 33, 2, 16
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(B, N, 3 * H * D, generator=g).to(DEV)
    q, k, v = (t.reshape(B, N, H, D) for t in fused.chunk(3, dim=-1))
    assert not q.is_contiguous()
    slope = torch.tensor([0.0, 0.4], device=DEV)
    q, k, v = (torch.nn.functional.silu(t) if i < 2 else t for i, t in enumerate((q, k, v)))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o, fin = lightning_attention_triton(*leaves, slope, None, output_final_state=False, chunk_size=16,
                                        num_segments=2)
    assert fin is None
    do = torch.randn(o.shape, generator=g).to(DEV)
    (o * do).sum().backward()
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    od, _ = lightning_attention_naive(*refs, slope.double())
    (od * do.double()).sum().backward()
    assert rel(o, od) < 1e-4
    for a, b in zip(leaves, refs):
        assert rel(a.grad, b.grad) < 1e-4


def test_gradient_of_initial_state_without_final_state_gradient():
    qkv, slope, s0, do, _ = _inputs(1, 50, 2, 16, 16, torch.float32, [0.0, 0.3], seed=11)
    s0r = s0.clone().requires_grad_()
    o, _ = lightning_attention_triton(*qkv, slope, s0r, chunk_size=16, num_segments=2)
    (o * do).sum().backward()
    s0d = s0.double().requires_grad_()
    od, _ = lightning_attention_naive(*(t.double() for t in qkv), slope.double(), s0d)
    (od * do.double()).sum().backward()
    assert rel(s0r.grad, s0d.grad) < 1e-4


# ------------------------------------------------------------------------------------------------ bad input
def _ok(B=1, N=8, H=2, DK=16, DV=16, dtype=torch.float32):
    return (torch.randn(B, N, H, DK, device=DEV, dtype=dtype), torch.randn(B, N, H, DK, device=DEV, dtype=dtype),
            torch.randn(B, N, H, DV, device=DEV, dtype=dtype), torch.zeros(H, device=DEV))


def test_clear_errors():
    q, k, v, s = _ok()
    with pytest.raises(TypeError, match="dtype"):
        lightning_attention_triton(q.double(), k.double(), v.double(), s)
    with pytest.raises(TypeError, match="dtype"):
        lightning_attention_triton(q.long(), k.long(), v.long(), s)
    with pytest.raises(TypeError, match="share one dtype"):
        lightning_attention_triton(q, k.half(), v, s)
    with pytest.raises(ValueError, match="4-D"):
        lightning_attention_triton(q[0], k[0], v[0], s)
    with pytest.raises(ValueError, match="shapes differ"):
        lightning_attention_triton(q, k[:, :4], v, s)
    with pytest.raises(ValueError, match="v's"):
        lightning_attention_triton(q, k, v[:, :4], s)
    with pytest.raises(ValueError, match="slope"):
        lightning_attention_triton(q, k, v, torch.zeros(3, device=DEV))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention_triton(q, k, v, s, torch.zeros(1, 2, 16, 8, device=DEV))
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attention_triton(q, k, v, s, chunk_size=48)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_segments must be None"):
            lightning_attention_triton(q, k, v, s, num_segments=bad)
    q2, k2, v2, _ = _ok(DK=MAX_DK + 1)
    with pytest.raises(ValueError, match="over the limits"):
        lightning_attention_triton(q2, k2, v2, s)
    q3, k3, v3, _ = _ok(DV=MAX_DV + 1)
    with pytest.raises(ValueError, match="over the limits"):
        lightning_attention_triton(q3, k3, v3, s)
    with pytest.raises(TypeError, match="torch.Tensor"):
        lightning_attention_triton(q, k, v, [0.0, 0.0])


def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, s = (t.cpu() for t in _ok())
    with pytest.raises(ValueError, match="CUDA"):
        lightning_attention_triton(q, k, v, s)


# ------------------------------------------------------------------------------------------------ GPU, large
def _fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:          # noqa: BLE001  (fla absent or broken: compare with the reference only)
        return None
    return chunk_simple_gla


@pytest.mark.gpu
# fla is compared at the benchmark's head dims only: each new head dim costs fla minutes of autotuning
@pytest.mark.parametrize("B,N,H,DK,DV,dtype,with_s0,with_fla", [
    (2, 4096, 16, 128, 128, torch.bfloat16, True, True),
    (1, 8191, 8, 128, 128, torch.bfloat16, False, True),
    (2, 2000, 4, 256, 128, torch.bfloat16, True, False),         # LRPE-doubled q/k
    (1, 3001, 4, 64, 64, torch.float32, True, False),
    (1, 1500, 4, 128, 64, torch.float16, True, False),
])
def test_gpu_large_vs_reference_and_fla(B, N, H, DK, DV, dtype, with_s0, with_fla):
    slopes = [0.0] + [2 ** (-8 * (h + 1) / H) for h in range(1, H)]
    qkv, slope, s0, do, dht = _inputs(B, N, H, DK, DV, dtype, slopes, seed=N, with_s0=with_s0)
    ours = _run_ours(qkv, slope, s0, do, dht)
    ref = _run_ref(qkv, slope, s0, do, dht, fn=lightning_attention_chunk)     # float64, linear in N
    errs = _compare(ours, ref, TOL[dtype])
    fla = _fla() if with_fla else None
    if fla is None:
        return
    # fla's chunk_simple_gla on the same inputs, scale 1 (no 1/sqrt(d)), in its constant-decay form g_gamma = -slope
    # (the same function as the per-token form g = -slope, whose backward fla 0.6.0 refuses on Hopper with Triton
    # 3.4 to 3.7.0, fla #640; g is only tried where g_gamma is missing: compiling both doubles fla's autotuning)
    fla_errs = None
    for form in ("g_gamma", "g"):
        leaves = [t.detach().clone().requires_grad_() for t in qkv]
        s0r = s0.detach().clone().requires_grad_() if s0 is not None else None
        decay = dict(g=(-slope.float())[None, None, :].expand(B, N, H).contiguous()) if form == "g" else \
            dict(g_gamma=-slope.float())
        try:
            o, fin = fla(*leaves, **decay, scale=1.0, initial_state=s0r, output_final_state=True)
            ((o.float() * do).sum() + (fin.float() * dht).sum()).backward()
        except RuntimeError as e:
            if "#640" in str(e):
                continue
            raise
        fla_out = (o, fin, [t.grad for t in leaves], s0r.grad if s0r is not None else None)
        fla_errs = _compare(fla_out, ref, 1.0, label=f"fla ({form}) ")
        break
    assert fla_errs is not None
    print(f"\nours {errs}\nfla ({form}) {fla_errs}")
    # ours must be no worse than fla's (10% slack for rounding noise between two bf16 computations)
    worse = {n: (errs[n], fla_errs[n]) for n in errs if errs[n] > 1.1 * fla_errs[n] + 1e-6}
    assert not worse, f"our error exceeds fla's: {worse}"


def test_narrow_tiles_are_never_tuned_at_8_warps():
    """The autotuners' pruning: tiles narrower than 64 (heads of 16 and 32) take the one config 4 warps x 2 stages
    (others crashed, see _warps_for_tiles); wide tiles keep the whole space."""
    import triton
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    space = [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 1), (8, 2))]
    for kern, (a, b) in ((tc._walk_kernel, ("BX", "BZ")), (tc._seg_local_kernel, ("BK", "BV"))):
        for narrow in ({a: 16, b: 16}, {a: 32, b: 16}, {a: 16, b: 128}, {a: 32, b: 32}, {a: 64, b: 32}):
            kept = kern.early_config_prune(space, {}, **narrow)
            assert [(c.num_warps, c.num_stages) for c in kept] == [(4, 2)], narrow
        assert kern.early_config_prune(space, {}, **{a: 64, b: 64}) == space
        assert kern.early_config_prune(space, {}, **{a: 128, b: 64}) == space


@pytest.mark.gpu
def test_gpu_every_autotune_config_is_correct():
    """Each (num_warps, num_stages) the autotuner may pick gives the right answer at the benchmark's tile shapes
    (Dk = Dv = 128, several segments, initial and final state)."""
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    qkv, slope, s0, do, dht = _inputs(1, 1000, 4, 128, 128, torch.bfloat16, [0.0, 0.01, 0.1, 0.5], seed=7)
    ref = _run_ref(qkv, slope, s0, do, dht, fn=lightning_attention_chunk)
    saved = os.environ.get("TNLLM_TRITON_AUTOTUNE")
    os.environ["TNLLM_TRITON_AUTOTUNE"] = "1"
    try:
        for cfg in tc._configs():
            tc._force_configs([cfg])
            ours = _run_ours(qkv, slope, s0, do, dht)
            _compare(ours, ref, TOL[torch.bfloat16], label=f"{cfg}: ")
    finally:
        if saved is None:
            os.environ.pop("TNLLM_TRITON_AUTOTUNE")
        else:
            os.environ["TNLLM_TRITON_AUTOTUNE"] = saved
        tc._force_configs(None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,DK,DV,N,segments", [
    (torch.bfloat16, 128, 128, 1000, 3),       # the benchmark's tiles, a partial last chunk, pre-pass and scan
    (torch.float32, 64, 64, 333, 2),           # fp32 lines hold half as many features
    (torch.float16, 32, 16, 129, None),        # tiles narrower than a line
])
def test_gpu_prefetch_changes_no_result(dtype, DK, DV, N, segments, monkeypatch):
    """The L2 prefetch of the next chunk (pre-pass and walks) moves no data into the computation: outputs, final
    state and every gradient are bit for bit those with it turned off, on strided inputs (a view of a wider tensor,
    as the model's q/k/v split gives) with several segments."""
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    B, H = 2, 3
    _, slope, s0, do, dht = _inputs(B, N, H, DK, DV, dtype, [0.0, 0.05, 0.5], seed=N)
    g = torch.Generator(device=DEV).manual_seed(N)
    wide = torch.randn(B, N, H, 2 * DK + DV + 8, device=DEV, generator=g).to(dtype)
    qkv = [wide[..., :DK], wide[..., DK:2 * DK], wide[..., 2 * DK:2 * DK + DV]]
    results = []
    for prefetch in (True, False):
        monkeypatch.setattr(tc, "_prefetches", lambda prefetch=prefetch: prefetch)
        results.append(_run_ours(qkv, slope, s0, do, dht, num_segments=segments))
    (o1, f1, g1, s1), (o2, f2, g2, s2) = results
    for a, b in [(o1, o2), (f1, f2), *zip(g1, g2), (s1, s2)]:
        assert torch.equal(a, b)


def _gluon_walks():
    """triton_chunk's Gluon walk module where its walks run (a Hopper GPU, Triton 3.6), else skip."""
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    if not CUDA or not tc.gluon_walks_run_on(DEV):
        pytest.skip("the Gluon walks run on Hopper GPUs with Triton 3.6 only")
    return tc._gluon_walk


def _qkvu_views(qkv, DK, DV):
    """q, k, v as views of one [B, N, H * (2 Dk + Dv + Dv)] tensor cut by heads, as the model's QKVU split gives:
    heads and features packed, rows 2 Dk + 2 Dv wide per head group."""
    q, k, v = qkv
    B, N, H, _ = q.shape
    wide = torch.randn(B, N, H * (2 * DK + 2 * DV), device=q.device).to(q.dtype)
    views = []
    for i, t in enumerate((q, k, v)):
        start = H * (i * DK if i < 2 else 2 * DK)
        view = wide[..., start:start + H * t.shape[-1]].view(B, N, H, t.shape[-1])
        view.copy_(t)
        views.append(view)
    return views


@pytest.mark.gpu
# launches (single Gluon walks, paired dk+dv walks): heads of 128 take the o and dq walks and the pair; both: the o
# and dq walks as programs holding both Z tiles (_walk_both_tiles_kernel), where batch*heads*segments fill an H200
@pytest.mark.parametrize("B,N,H,DK,DV,segments,dtype,with_s0,packed,launches,both", [
    (2, 1000, 3, 128, 128, 3, torch.bfloat16, True, False, (2, 1), False),  # partial last chunk, pre-pass, states
    (3, 10, 2, 128, 128, None, torch.bfloat16, False, True, (2, 1), False),  # shorter than a chunk, QKVU-split views
    (2, 2049, 2, 128, 128, None, torch.float16, True, False, (2, 1), True),  # 33 segments
    (1, 4096, 2, 128, 128, 16, torch.bfloat16, True, True, (2, 1), False),   # many segments
    (1, 448, 4, 128, 64, 2, torch.float16, True, True, (2, 0), False),  # Dv 64: the o and dv walks (X 128 wide) only
    (1, 777, 2, 256, 128, 2, torch.bfloat16, True, False, (2, 0), False),  # LRPE-doubled Dk: the dq and dk walks only
    (2, 2049, 16, 128, 128, 4, torch.bfloat16, True, True, (2, 1), True),   # 128 programs holding both tiles
    (8, 1000, 16, 128, 128, None, torch.float16, False, False, (2, 1), True),
    (2, 1000, 16, 128, 128, None, torch.bfloat16, True, False, (2, 1), True),  # planned: 4 segments, not 2 (_plan)
])
def test_gpu_gluon_walks_against_reference_and_triton_walks(B, N, H, DK, DV, segments, dtype, with_s0, packed,
                                                           launches, both, monkeypatch, count_gluon_launches):
    """Where the Gluon walks run (Hopper, Triton 3.6) they take the walks they apply to (counted), and outputs,
    final state and every gradient are within tolerance of float64 and as close as the Triton walks' (0.1% slack:
    the two round the same products the same way; on an H200 their errors agreed within 1.3e-4 relative, and the
    dv walk rounding dO instead of the decayed q raised dv's by 0.2-0.3%), across
    partial chunks, segments, initial states, fp16 and bf16, and strided views; with the o and dq walks as
    two-tile programs where those fill the GPU (which walks those are is checked on GPUs of 132 SMs, H100 SXM and
    H200, the count the expectations are for)."""
    gw = _gluon_walks()
    sms_expected = torch.cuda.get_device_properties(DEV).multi_processor_count == 132
    kernels = []
    launch = gw._launch

    def recorded(kernel, *args, **kwargs):
        kernels.append(kernel.fn.__name__)
        return launch(kernel, *args, **kwargs)
    monkeypatch.setattr(gw, "_launch", recorded)
    slopes = ([0.0, 0.3, 0.02, 0.9] * 4)[:H]           # 16 heads at most
    qkv, slope, s0, do, dht = _inputs(B, N, H, DK, DV, dtype, slopes, seed=N + DK, with_s0=with_s0)
    if packed:
        qkv = _qkvu_views(qkv, DK, DV)
    ref = _run_ref(qkv, slope, s0, do, dht, fn=lightning_attention_chunk)
    assert packed == (not qkv[0].is_contiguous())
    launched = count_gluon_launches(gw)
    gluon = _compare(_run_ours(qkv, slope, s0, do, dht, num_segments=segments), ref, TOL[dtype], label="gluon ")
    assert launched == list(launches), launched
    if sms_expected:
        assert kernels.count("_walk_both_tiles_kernel") == (2 if both else 0), kernels
    monkeypatch.setenv("TNLLM_GLUON_WALKS", "0")
    triton_errs = _compare(_run_ours(qkv, slope, s0, do, dht, num_segments=segments), ref, TOL[dtype], label="triton ")
    assert launched == list(launches)
    print(f"\ngluon {gluon}\ntriton {triton_errs}")
    worse = {n: (gluon[n], triton_errs[n]) for n in gluon if gluon[n] > 1.001 * triton_errs[n] + 1e-6}
    assert not worse, f"the Gluon walks' error exceeds the Triton walks': {worse}"


def test_gluon_walks_only_import_with_the_triton_release_they_are_written_for():
    """With any Triton but 3.6 (whose Gluon API the walks are written in) gluon_walk.py refuses to import, naming
    the release, and the Triton walks run everywhere."""
    import importlib
    import triton
    if triton.__version__.startswith("3.6."):
        pytest.skip("this is the Gluon walks' own Triton release")
    with pytest.raises(ImportError, match=f"this is Triton {triton.__version__}"):
        importlib.import_module("tnllm_kernels.lightning_attention.gluon_walk")
    from tnllm_kernels.lightning_attention import triton_chunk as tc
    assert tc._gluon_walk is None and not tc.gluon_walks_run_on(DEV)
