"""One decoding step of GLA's token mixer in two Triton kernels (the reference is reference.py).

Why: under a CUDA graph the one-token step of the 385M model costs mostly kernel launches; the PyTorch
composition of activation, LRPE, state update, o = q S, norm and gate is ~15 small kernels per layer (and
several passes over the fp32 state). Here:

* ``_step_kernel``, one program per (batch row, head, tile of BLOCK_V state columns): loads its q, k and v
  slices straight from the QKVU projection, applies the activation and LRPE (angles from the row's position,
  read from device memory so a replayed graph sees it advance), updates its [Dk, BLOCK_V] tile of the fp32 state
  (in place when asked: the state is read and written once) and writes its slice of o. q and k are recomputed by
  every column tile of a head: a few hundred flops against a state tile of 8 kB or more.
* ``_norm_gate_kernel``, one program per row: srms_norm(o) * u over the whole hidden dim (it spans every head,
  so it cannot live in the per-head programs without a grid-wide sync).

Both decode kernels of a block (these and decode_linear's GEMVs) launch with programmatic dependent launch on
sm_90+ (``pdl_launch``): each program first loads what no earlier kernel of the step writes (its weights, its state
tile), then waits for the previous kernel (``gdc_wait``: it has finished and its writes are visible) and lets the next
one start (``gdc_launch_dependents``). The next kernel's programs then load their weights while this one finishes,
instead of after it: the gap between two small kernels is otherwise a launch plus a first DRAM latency. Every
kernel launched this way waits before it reads or writes anything an earlier kernel touches, so the chain stays
ordered transitively.

Roundings follow the model's composition (activation, LRPE and o rounded to the input dtype, the rest fp32), so in
bf16 both give the same numbers up to the order of fp32 sums. Nothing here reads back to the host or allocates by
value: both kernels can be captured in a CUDA graph.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._interpreter import interpreting
from .reference import check_with_sumsq

MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ACT_CODE = {"none": 0, "silu": 1, "1+elu": 2}


try:        # programmatic dependent launch from Triton kernels (Triton >= 3.3)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


def pdl_launch(t: torch.Tensor) -> bool:
    """Whether the decode kernels launch with programmatic dependent launch for tensors on t's device: sm_90 or newer,
    a Triton that has it, not the CPU interpreter, and not switched off with TNLLM_PDL=0 (benchmarks' A/B)."""
    if gdc_wait is None or not t.is_cuda or interpreting() or os.environ.get("TNLLM_PDL", "1") == "0":
        return False
    return _compute_capability_major(t.device.index) >= 9


@functools.lru_cache(maxsize=None)
def _compute_capability_major(index: int) -> int:
    # asked at every decode kernel launch (eager decoding launches ~5 a layer per token): the driver once per device
    return torch.cuda.get_device_capability(index)[0]


@triton.jit
def _pdl_handoff(PDL: tl.constexpr):
    """Wait until the previous kernel has finished (its writes visible), then let the next one launch. Called by every
    program after loading only what no kernel of this step writes."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


# libdevice's exp/cos/sin on the GPU, the accurate ones torch's kernels use (full range reduction: the angles p theta
# of late positions reach 1e5 rad at 100k tokens); tl.exp goes through the approximate ex2, and tl.cos/sin promise
# no accuracy at such angles. The CPU interpreter has no libdevice (its tl.* are numpy's, accurate already).
@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _round(x, DT: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    """fp32 x rounded to DT's precision (round to nearest even), kept in fp32. The interpreter's fp32 -> bf16 cast
    truncates (the GPU's rounds to nearest even), so there the bf16 rounding is done on the bits: the CPU tests
    then see the GPU's numbers."""
    if RNE_BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(DT).to(tl.float32)


@triton.jit
def _act_round(x, ACT: tl.constexpr, LIBDEVICE: tl.constexpr, DT: tl.constexpr, RNE: tl.constexpr):
    # fp32 math rounded to the input dtype, as torch's kernels do; 1 + elu rounds elu first, as the composition's
    # two ops do
    if ACT == 1:
        return _round(x / (1.0 + _exp(-x, LIBDEVICE)), DT, RNE)
    elif ACT == 2:
        if LIBDEVICE:
            elu = tl.where(x > 0, x, libdevice.expm1(x))
        else:
            elu = tl.where(x > 0, x, tl.exp(x) - 1.0)
        return _round(1.0 + _round(elu, DT, RNE), DT, RNE)
    else:
        return x


@triton.jit(do_not_specialize=["pos0"])
def _step_kernel(QKVU, S_IN, S_OUT, SLOPE, POS, THETA, O, SSQ,
                 pos0, H, E, HIDDEN, stride_xb,
                 stride_ib, stride_ih, stride_ik, stride_iv,
                 stride_ob, stride_oh, stride_ok, stride_ov,
                 ACT: tl.constexpr, LRPE: tl.constexpr, ROW_POS: tl.constexpr, LIBDEVICE: tl.constexpr,
                 RNE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr,
                 SSQ_ON: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    DT = O.dtype.element_ty
    e = tl.arange(0, BLOCK_E)
    em = e < E
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cm = cols < E
    m = em[:, None] & cm[None, :]
    s_in = S_IN + b.to(tl.int64) * stride_ib + h * stride_ih + e[:, None] * stride_ik + cols[None, :] * stride_iv
    s_out = S_OUT + b.to(tl.int64) * stride_ob + h * stride_oh + e[:, None] * stride_ok + cols[None, :] * stride_ov
    # the state tile first: this layer's previous step wrote it, long before the kernel this one follows
    s1 = tl.load(s_in, mask=m, other=0.0)
    if LRPE:    # rows [0, E) of the state pair with x cos(theta p), rows [E, 2E) with x sin(theta p)
        s2 = tl.load(s_in + E * stride_ik, mask=m, other=0.0)
    _pdl_handoff(PDL)
    x = QKVU + b.to(tl.int64) * stride_xb + h * E
    q = tl.load(x + e, mask=em, other=0.0).to(tl.float32)
    k = tl.load(x + HIDDEN + e, mask=em, other=0.0).to(tl.float32)
    v = tl.load(x + 2 * HIDDEN + cols, mask=cm, other=0.0).to(tl.float32)
    # the padding lanes past E must stay 0 after the activation (1 + elu(0) = 1 would add v to the sums)
    q = tl.where(em, _act_round(q, ACT, LIBDEVICE, DT, RNE), 0.0)
    k = tl.where(em, _act_round(k, ACT, LIBDEVICE, DT, RNE), 0.0)
    lam = _exp(-tl.load(SLOPE + h).to(tl.float32), LIBDEVICE)
    if LRPE:
        if ROW_POS:
            p = tl.load(POS + b).to(tl.float32)
        else:
            p = pos0.to(tl.float32)
        angle = p * tl.load(THETA + h * E + e, mask=em, other=0.0).to(tl.float32)
        if LIBDEVICE:
            c = libdevice.cos(angle)
            s = libdevice.sin(angle)
        else:
            c = tl.cos(angle)
            s = tl.sin(angle)
        qc = _round(q * c, DT, RNE)
        qs = _round(q * s, DT, RNE)
        kc = _round(k * c, DT, RNE)
        ks = _round(k * s, DT, RNE)
        s1 = lam * s1 + kc[:, None] * v[None, :]
        s2 = lam * s2 + ks[:, None] * v[None, :]
        tl.store(s_out, s1, mask=m)
        tl.store(s_out + E * stride_ok, s2, mask=m)
        o = tl.sum(qc[:, None] * s1, axis=0) + tl.sum(qs[:, None] * s2, axis=0)
    else:
        s1 = lam * s1 + k[:, None] * v[None, :]
        tl.store(s_out, s1, mask=m)
        o = tl.sum(q[:, None] * s1, axis=0)
    o = _round(o, DT, RNE)
    tl.store(O + b.to(tl.int64) * HIDDEN + h * E + cols, o.to(DT), mask=cm)
    if SSQ_ON:  # this program's part of its row's sum of squares of o: SSQ [B, H * column tiles]
        tiles = tl.num_programs(1)
        tl.store(SSQ + b.to(tl.int64) * H * tiles + h * tiles + tl.program_id(1), tl.sum(tl.where(cm, o * o, 0.0)))


@triton.jit
def _norm_gate_kernel(O, U, Y, D, stride_ub, eps, RNE: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    DT = Y.dtype.element_ty
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = tl.load(O + row * D + d0 + cols, mask=d0 + cols < D, other=0.0).to(tl.float32)
        acc += x * x
    r = tl.rsqrt(tl.sum(acc, axis=0) / D + eps)
    for d0 in range(0, D, BLOCK_D):
        mk = d0 + cols < D
        x = tl.load(O + row * D + d0 + cols, mask=mk, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_ub + d0 + cols, mask=mk, other=0.0).to(tl.float32)
        # the normalised o is rounded before the gate, as srms_norm(o) * u rounds it
        tl.store(Y + row * D + d0 + cols, _round(_round(x * r, DT, RNE) * u, DT, RNE).to(DT), mask=mk)


def _step_tiles(rows_heads: int, head_dim: int, lrpe: bool):
    """(BLOCK_V, num_warps): columns of the state per program and warps. The widest power of two up to 64 columns
    whose state tile holds at most 16384 fp32 values (Dk x BLOCK_V: 64 columns of a 128-wide head, 64 with LRPE's
    Dk = 256) and still gives 128 programs, at least 16 columns; 4 warps.

    Kernel alone (benchmarks/decode_step_tiles.py, H200, 385M: 8 heads of 128, bf16; tenth and eleventh sessions)
    128 columns were fastest at 16 rows. Inside the CUDA-graph decode step (benchmarks/decode_tiles_in_step.py,
    twelfth session, benchmarks/RESULTS.md), where the next kernels' programs start beside this one's, 64 columns
    took 54 us less a token at 16 rows (0.773 against 0.827 ms; 32: -16 us), and this rule's choices were the fastest
    or within 7 us at 4 and 8 rows (1 row: 16 columns, 64 programs)."""
    block_e = max(16, triton.next_power_of_2(head_dim))
    bv = max(16, min(64, block_e, 16384 // (block_e * (2 if lrpe else 1))))
    while bv > 16 and rows_heads * triton.cdiv(head_dim, bv) < 128:
        bv //= 2
    return bv, 4


def check_inputs(qkvu, state, slope, positions, theta, act):
    """A clear error for what the kernels cannot take; returns (B, H, E, hidden)."""
    for name, t in (("qkvu", qkvu), ("state", state), ("slope", slope)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gla_decode_step_triton: {name} must be a torch.Tensor, got {type(t).__name__}")
    if qkvu.dtype not in _DTYPES:
        raise TypeError(f"gla_decode_step_triton: qkvu dtype {qkvu.dtype} not supported (float32, bfloat16, float16)")
    if state.dtype != torch.float32:
        raise TypeError(f"gla_decode_step_triton: the state must be float32, got {state.dtype}")
    if qkvu.dim() != 2 or state.dim() != 4:
        raise ValueError(f"gla_decode_step_triton: qkvu [B, 4*hidden] and state [B, H, Dk, Dv] expected, got "
                         f"{tuple(qkvu.shape)} and {tuple(state.shape)}")
    b, h, dk, e = state.shape
    hidden = h * e
    if qkvu.shape != (b, 4 * hidden):
        raise ValueError(f"gla_decode_step_triton: qkvu's shape {tuple(qkvu.shape)} != (B, 4 * H * Dv) = "
                         f"{(b, 4 * hidden)} for the state's {tuple(state.shape)}")
    if dk != (2 * e if theta is not None else e):
        raise ValueError(f"gla_decode_step_triton: the state's Dk={dk} must be {'2 * ' if theta is not None else ''}"
                         f"Dv={e} {'with' if theta is not None else 'without'} LRPE")
    if e > MAX_HEAD_DIM:
        raise ValueError(f"gla_decode_step_triton: head dim {e} over the limit {MAX_HEAD_DIM}")
    if qkvu.stride(-1) != 1:
        raise ValueError("gla_decode_step_triton: qkvu's last dimension must be contiguous")
    if tuple(slope.shape) != (h,):
        raise ValueError(f"gla_decode_step_triton: slope must be [H]={h}, got {tuple(slope.shape)}")
    if theta is not None and theta.numel() != hidden:
        raise ValueError(f"gla_decode_step_triton: theta has {theta.numel()} values, LRPE needs H * Dv = {hidden}")
    if act not in _ACT_CODE:
        raise ValueError(f"gla_decode_step_triton: unknown q/k activation {act!r}; expected one of {tuple(_ACT_CODE)}")
    if torch.is_tensor(positions) and tuple(positions.shape) != (b,):
        raise ValueError(f"gla_decode_step_triton: positions must be an int or [B]={b}, got {tuple(positions.shape)}")
    tensors = [qkvu, state, slope] + [t for t in (theta, positions) if torch.is_tensor(t)]
    if any(t.device != qkvu.device for t in tensors):
        raise ValueError("gla_decode_step_triton: every tensor must be on qkvu's device")
    if qkvu.device.type != "cuda" and not interpreting():
        raise ValueError(f"gla_decode_step_triton: needs CUDA tensors (the CPU path is gla_decode_step_reference), "
                         f"got {qkvu.device}")
    return b, h, e, hidden


def gla_decode_step_triton(qkvu, state, slope, positions=0, theta=None, act: str = "silu", norm_eps=None,
                           in_place: bool = False, tiles=None, with_sumsq: bool = False):
    """Same contract as gla_decode_step_reference. ``positions``: an int, or a tensor [B] on the device (what a
    CUDA graph needs: the value is read by the kernel at replay). ``tiles``: (BLOCK_V, num_warps) of the step kernel
    instead of _step_tiles's (benchmarks/decode_step_tiles.py sweeps them). ``with_sumsq`` (without norm_eps):
    also return o's rows' sums of squares in parts, [B, H * Dv / BLOCK_V] fp32, for the next kernel's norm."""
    b, h, e, hidden = check_inputs(qkvu, state, slope, positions, theta, act)
    new_state = state if in_place else torch.empty_like(state)
    o = torch.empty(b, hidden, dtype=qkvu.dtype, device=qkvu.device)
    row_pos = torch.is_tensor(positions)
    rne = interpreting() and qkvu.dtype == torch.bfloat16
    slope = slope.float().contiguous()
    theta_arg = theta.reshape(-1).contiguous() if theta is not None else slope      # any pointer when unused
    bv, num_warps = tiles if tiles is not None else _step_tiles(b * h, e, theta is not None)
    if not (bv >= 1 and bv & (bv - 1) == 0 and num_warps >= 1 and num_warps & (num_warps - 1) == 0):
        raise ValueError(f"gla_decode_step_triton: tiles (BLOCK_V, num_warps) must be powers of two, got {tiles}")
    block_e = max(16, triton.next_power_of_2(e))
    check_with_sumsq(with_sumsq, norm_eps, "gla_decode_step_triton")
    ssq = torch.empty(b, h * triton.cdiv(e, bv), dtype=torch.float32, device=qkvu.device) if with_sumsq else None
    pdl = pdl_launch(qkvu)
    if b > 0:
        _step_kernel[(b * h, triton.cdiv(e, bv))](
            qkvu, state, new_state, slope, positions if row_pos else slope, theta_arg, o,
            ssq if ssq is not None else slope,
            0 if row_pos else int(positions), h, e, hidden, qkvu.stride(0),
            *state.stride(), *new_state.stride(),
            ACT=_ACT_CODE[act], LRPE=theta is not None, ROW_POS=row_pos, LIBDEVICE=not interpreting(), RNE=rne,
            BLOCK_E=block_e, BLOCK_V=bv, PDL=pdl, SSQ_ON=ssq is not None, num_warps=num_warps,
            **({"launch_pdl": True} if pdl else {}))
    if norm_eps is None:
        return (o, new_state, ssq) if with_sumsq else (o, new_state)
    if not float(norm_eps) >= 0:
        raise ValueError(f"gla_decode_step_triton: norm_eps must be >= 0, got {norm_eps}")
    y = torch.empty_like(o)
    u = qkvu[:, 3 * hidden:]
    block_d = min(4096, max(16, triton.next_power_of_2(hidden)))
    if b > 0:
        _norm_gate_kernel[(b,)](o, u, y, hidden, qkvu.stride(0), float(norm_eps), RNE=rne, BLOCK_D=block_d,
                                num_warps=4 if block_d <= 2048 or interpreting() else 8)
    return y, new_state


__all__ = ["MAX_HEAD_DIM", "check_inputs", "gla_decode_step_triton", "pdl_launch"]
