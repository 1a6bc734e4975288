"""Causal decayed linear attention ("lightning attention") in Triton, forward and backward, linear in N.

    o_s = sum_{t <= s} lambda^(s - t) (q_s . k_t) v_t + lambda^(s + 1) q_s S_0,    lambda = exp(-slope[h])

Layout: q, k [B, N, H, Dk]; v [B, N, H, Dv]; state [B, H, Dk, Dv] fp32; slope [H].

Design (chunks of C tokens, C = 64):
* Inside a chunk: the masked left product ((Q K^T) * M) V. The decay is a constant per head, so the mask
  M[i, j] = lambda^(i - j), the query decays lambda^(i + 1) and the key decays lambda^(C - 1 - j) are the
  same for every chunk: they are computed once per program from ``slope`` (no cumulative sum of gates).
* Between chunks: the fp32 state S [Dk, Dv] carried in registers while a program walks its chunks.
  No per-chunk state is written to memory (the backward recomputes), so memory stays O(B N H D).
* Parallelism for long sequences: the sequence is cut into ``NSEG`` segments of whole chunks. A parallel
  pre-pass computes each segment's own state contribution (sum_t lambda^(end - 1 - t) k_t v_t^T), a tiny
  scan over segments (elementwise in the Dk x Dv entries, because the decay is a scalar) turns them into
  each segment's initial state, and then one program per (batch*head, segment, Dv tile) walks its chunks.
  The number of segments is picked so that the grid fills the GPU whatever B and N are.
* Backward: three walks, each with the same segment pre-pass and scan: a forward walk for dq (carrying S^T,
  tiled over Dk), and reverse walks for dk (carrying dS^T, tiled over Dk) and dv (carrying dS, tiled over Dv),
  where dS is the gradient of the state. The gradient of the final state seeds the reverse walks; the dv walk's
  dS after segment 0 is the gradient of the initial state. The transposed intra-chunk products are formed from
  the loaded tiles: no matrix-unit result is transposed in registers and fed to another product, the pattern
  Triton 3.4 to 3.7.0 miscompiles on Hopper (fla issue #640).
* fp32 accumulation everywhere, fp32 states; matrix-unit operands in the input dtype (fp32 inputs use
  ``tf32x3``, about fp32 accuracy).

Measured on one H100 (benchmarks/RESULTS.md, "Lightning attention (issue 3)"): bf16, H=16, D=128, 32768 tokens,
fwd+bwd 1.2 to 1.8 ms against 2.2 to 2.7 ms for fla 0.6.0 chunk_simple_gla, at half its peak memory.
"""
import inspect
import os

import torch
import triton
import triton.language as tl

MAX_DK = 256
MAX_DV = 128
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# keep autotuning results in Triton's cache directory where this Triton can (saves re-tuning in a new process)
_AUTOTUNE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _configs(extra=None):
    """A small autotuning space (warps x pipelining depth); a single config in the interpreter."""
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    if os.environ.get("TNLLM_TRITON_AUTOTUNE", "1") == "0":      # one config, e.g. for quick GPU tests
        return [triton.Config({}, num_warps=8, num_stages=2)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 1), (8, 2))]


# ----------------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation. PREC "up32": operands upcast to fp32 first (the CPU interpreter's dot is
    wrong on 16-bit operands; upcasting the already-rounded operands computes the same products exactly)."""
    if PREC == "up32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _seg_bounds(pid_s, CPS, NC, C: tl.constexpr):
    c_lo = pid_s * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    return c_lo, c_hi


# ----------------------------------------------------------------------------------------------------------
# segment pre-pass: each segment's own contribution to the state at its end (forward) or start (backward)
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=["BK", "BV", "C", "REVERSE"], **_AUTOTUNE_KW)
@triton.jit
def _seg_local_kernel(
    A, Bm, SLOPE, BUF,
    sab, san, sah, sad, sbb, sbn, sbh, sbd,
    N, H, NC, CPS, NSEG,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Forward (REVERSE=0): A=k, Bm=v; segment s < NSEG-1 gets sum_t lambda^(E_s-1-t) k_t v_t^T written to
    BUF[b, h, s+1]. Backward (REVERSE=1): A=q, Bm=do; segment s >= 1 gets sum_t lambda^(t+1-T_s) q_t do_t^T
    written to BUF[b, h, s-1]."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    if REVERSE:
        pid_s = pid_s + 1
    b = pid_bh // H
    h = pid_bh % H
    sl2 = tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    c_lo, c_hi = _seg_bounds(pid_s, CPS, NC, C)
    t_lo = c_lo * C
    t_hi = tl.minimum(c_hi * C, N)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    kmask = offs_k < DK
    vmask = offs_v < DV
    a_base = A + b.to(tl.int64) * sab + h.to(tl.int64) * sah
    b_base = Bm + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(c_lo, c_hi):
        rows = c * C + offs_c
        rmask = rows < N
        a = tl.load(a_base + rows[:, None].to(tl.int64) * san + offs_k[None, :] * sad,
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        bb = tl.load(b_base + rows[:, None].to(tl.int64) * sbn + offs_v[None, :] * sbd,
                     mask=rmask[:, None] & vmask[None, :], other=0.0)
        if REVERSE:
            dec = tl.exp2(-sl2 * (rows - t_lo + 1).to(tl.float32))
        else:
            dec = tl.exp2(-sl2 * (t_hi - 1 - rows).to(tl.float32))
        dec = tl.where(rmask, dec, 0.0)
        a = (a * dec[:, None]).to(A.dtype.element_ty)
        acc += _mm(tl.trans(a), bb, DOT_PREC)
    if REVERSE:
        out_s = pid_s - 1
    else:
        out_s = pid_s + 1
    base = BUF + ((pid_bh.to(tl.int64) * NSEG + out_s) * DK) * DV
    tl.store(base + offs_k[:, None] * DV + offs_v[None, :], acc, mask=kmask[:, None] & vmask[None, :])


@triton.jit
def _seg_scan_kernel(BUF, SLOPE, H, N, NSEG, SEGLEN, DKDV, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """In place over BUF [B*H, NSEG, Dk*Dv]. Forward: BUF[0] holds S_0 (or 0), BUF[s] holds segment s-1's
    own contribution; afterwards BUF[s] is the state entering segment s. Reverse: BUF[NSEG-1] holds dS_N (or
    0), BUF[s] holds segment s+1's contribution; afterwards BUF[s] is dS at the end of segment s."""
    pid_bh = tl.program_id(0)
    pid_e = tl.program_id(1)
    h = pid_bh % H
    sl2 = tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    m = offs < DKDV
    base = BUF + pid_bh.to(tl.int64) * NSEG * DKDV + offs
    if REVERSE:
        run = tl.load(base + (NSEG - 1) * DKDV, mask=m, other=0.0)
        for i in range(0, NSEG - 1):
            s = NSEG - 2 - i
            seg_len = tl.minimum(N, (s + 2) * SEGLEN) - (s + 1) * SEGLEN    # length of segment s+1
            run = run * tl.exp2(-sl2 * seg_len.to(tl.float32)) + tl.load(base + s * DKDV, mask=m, other=0.0)
            tl.store(base + s * DKDV, run, mask=m)
    else:
        run = tl.load(base, mask=m, other=0.0)
        dec = tl.exp2(-sl2 * SEGLEN.to(tl.float32))                           # segments before the last are full
        for s in range(1, NSEG):
            run = run * dec + tl.load(base + s * DKDV, mask=m, other=0.0)
            tl.store(base + s * DKDV, run, mask=m)


# ----------------------------------------------------------------------------------------------------------
# forward: o, and the final state
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=["BK", "BV", "C", "HAS_S0", "STORE_FINAL"], **_AUTOTUNE_KW)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, SLOPE, S0, SFIN,
    sqb, sqn, sqh, sqd, skb, skn, skh, skd, svb, svn, svh, svd, sob, son, soh,
    s0_bh, s0_s,
    N, H, NC, CPS, NSEG,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    dt = Q.dtype.element_ty
    sl2 = tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    kmask = offs_k < DK
    vmask = offs_v < DV
    gap = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
    mask_dec = tl.where(gap >= 0, tl.exp2(-sl2 * tl.maximum(gap, 0.0)), 0.0)     # [C, C], chunk-invariant
    q_dec = tl.exp2(-sl2 * (offs_c + 1).to(tl.float32))                           # lambda^(i+1)

    if HAS_S0:
        p_s = S0 + pid_bh.to(tl.int64) * s0_bh + pid_s.to(tl.int64) * s0_s
        S = tl.load(p_s + offs_k[:, None] * DV + offs_v[None, :], mask=kmask[:, None] & vmask[None, :], other=0.0)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)

    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    o_base = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    c_lo, c_hi = _seg_bounds(pid_s, CPS, NC, C)
    for c in range(c_lo, c_hi):
        rows = c * C + offs_c
        rmask = rows < N
        r64 = rows[:, None].to(tl.int64)
        q = tl.load(q_base + r64 * sqn + offs_k[None, :] * sqd, mask=rmask[:, None] & kmask[None, :], other=0.0)
        k = tl.load(k_base + r64 * skn + offs_k[None, :] * skd, mask=rmask[:, None] & kmask[None, :], other=0.0)
        v = tl.load(v_base + r64 * svn + offs_v[None, :] * svd, mask=rmask[:, None] & vmask[None, :], other=0.0)
        kt = tl.trans(k)
        a = _mm(q, kt, DOT_PREC) * mask_dec
        o = _mm(a.to(dt), v, DOT_PREC)
        o += _mm(q, S.to(dt), DOT_PREC) * q_dec[:, None]
        tl.store(o_base + r64 * son + offs_v[None, :], o.to(O.dtype.element_ty), mask=rmask[:, None] & vmask[None, :])
        m = tl.minimum(N - c * C, C)
        k_dec = tl.where(offs_c < m, tl.exp2(-sl2 * (m - 1 - offs_c).to(tl.float32)), 0.0)
        S = S * tl.exp2(-sl2 * m.to(tl.float32)) + _mm(kt, (v * k_dec[:, None]).to(dt), DOT_PREC)

    if STORE_FINAL:
        if pid_s == NSEG - 1:
            p_f = SFIN + pid_bh.to(tl.int64) * DK * DV
            tl.store(p_f + offs_k[:, None] * DV + offs_v[None, :], S, mask=kmask[:, None] & vmask[None, :])


# ----------------------------------------------------------------------------------------------------------
# backward. No kernel transposes a matrix-unit result in registers before feeding it to another product (the
# pattern that Triton 3.4 to 3.7.0 miscompiles on Hopper, fla issue #640): the transposed products are formed
# from the loaded tiles, and each walk carries its state in the orientation its products need.
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=["BK", "BV", "C", "HAS_S0"], **_AUTOTUNE_KW)
@triton.jit
def _bwd_dq_kernel(
    K, V, DO, DQ, SLOPE, S0,
    skb, skn, skh, skd, svb, svn, svh, svd, sdob, sdon, sdoh, sdod, sdqb, sdqn, sdqh,
    s0_bh, s0_s,
    N, H, NC, CPS,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_S0: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dq = ((dO V^T) * M) K + lambda^(i+1) dO S^T: a forward walk carrying S^T [Dv, BK] (a Dk tile, all of Dv)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_k = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    dt = K.dtype.element_ty
    sl2 = tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    offs_c = tl.arange(0, C)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    kmask = offs_k < DK
    vmask = offs_v < DV
    gap = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
    mask_dec = tl.where(gap >= 0, tl.exp2(-sl2 * tl.maximum(gap, 0.0)), 0.0)       # [i, j]
    q_dec = tl.exp2(-sl2 * (offs_c + 1).to(tl.float32))

    if HAS_S0:
        p_s = S0 + pid_bh.to(tl.int64) * s0_bh + pid_s.to(tl.int64) * s0_s
        ST = tl.load(p_s + offs_k[None, :] * DV + offs_v[:, None], mask=vmask[:, None] & kmask[None, :], other=0.0)
    else:
        ST = tl.zeros([BV, BK], dtype=tl.float32)

    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    do_base = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
    dq_base = DQ + b.to(tl.int64) * sdqb + h.to(tl.int64) * sdqh
    c_lo, c_hi = _seg_bounds(pid_s, CPS, NC, C)
    for c in range(c_lo, c_hi):
        rows = c * C + offs_c
        rmask = rows < N
        r64 = rows[:, None].to(tl.int64)
        k = tl.load(k_base + r64 * skn + offs_k[None, :] * skd, mask=rmask[:, None] & kmask[None, :], other=0.0)
        v = tl.load(v_base + r64 * svn + offs_v[None, :] * svd, mask=rmask[:, None] & vmask[None, :], other=0.0)
        do = tl.load(do_base + r64 * sdon + offs_v[None, :] * sdod, mask=rmask[:, None] & vmask[None, :], other=0.0)
        da = _mm(do, tl.trans(v), DOT_PREC) * mask_dec
        dq = _mm(da.to(dt), k, DOT_PREC)
        dq += _mm(do, ST.to(dt), DOT_PREC) * q_dec[:, None]
        tl.store(dq_base + r64 * sdqn + offs_k[None, :], dq.to(DQ.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])
        m = tl.minimum(N - c * C, C)
        k_dec = tl.where(offs_c < m, tl.exp2(-sl2 * (m - 1 - offs_c).to(tl.float32)), 0.0)
        ST = ST * tl.exp2(-sl2 * m.to(tl.float32)) + _mm(tl.trans((v * k_dec[:, None]).to(dt)), k, DOT_PREC)


@triton.autotune(configs=_configs(), key=["BK", "BV", "C", "HAS_D0"], **_AUTOTUNE_KW)
@triton.jit
def _bwd_dk_kernel(
    Q, V, DO, DK_, SLOPE, D0,
    sqb, sqn, sqh, sqd, svb, svn, svh, svd, sdob, sdon, sdoh, sdod, sdkb, sdkn, sdkh,
    d0_bh, d0_s,
    N, H, NC, CPS,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_D0: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dk = ((V dO^T) * M^T) Q + lambda^(m-1-j) V dS^T: a reverse walk carrying dS^T [Dv, BK]."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_k = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    dt = Q.dtype.element_ty
    sl2 = tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    offs_c = tl.arange(0, C)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    kmask = offs_k < DK
    vmask = offs_v < DV
    gap = (offs_c[None, :] - offs_c[:, None]).to(tl.float32)                      # [j, i]: i - j
    mask_t = tl.where(gap >= 0, tl.exp2(-sl2 * tl.maximum(gap, 0.0)), 0.0)
    q_dec = tl.exp2(-sl2 * (offs_c + 1).to(tl.float32))

    if HAS_D0:
        p_d = D0 + pid_bh.to(tl.int64) * d0_bh + pid_s.to(tl.int64) * d0_s
        DT = tl.load(p_d + offs_k[None, :] * DV + offs_v[:, None], mask=vmask[:, None] & kmask[None, :], other=0.0)
    else:
        DT = tl.zeros([BV, BK], dtype=tl.float32)

    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    do_base = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
    dk_base = DK_ + b.to(tl.int64) * sdkb + h.to(tl.int64) * sdkh
    c_lo, c_hi = _seg_bounds(pid_s, CPS, NC, C)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        rows = c * C + offs_c
        rmask = rows < N
        r64 = rows[:, None].to(tl.int64)
        q = tl.load(q_base + r64 * sqn + offs_k[None, :] * sqd, mask=rmask[:, None] & kmask[None, :], other=0.0)
        v = tl.load(v_base + r64 * svn + offs_v[None, :] * svd, mask=rmask[:, None] & vmask[None, :], other=0.0)
        do = tl.load(do_base + r64 * sdon + offs_v[None, :] * sdod, mask=rmask[:, None] & vmask[None, :], other=0.0)
        m = tl.minimum(N - c * C, C)
        k_dec = tl.where(offs_c < m, tl.exp2(-sl2 * (m - 1 - offs_c).to(tl.float32)), 0.0)
        dat = _mm(v, tl.trans(do), DOT_PREC) * mask_t                                # [j, i]
        dk = _mm(dat.to(dt), q, DOT_PREC)
        dk += _mm(v, DT.to(dt), DOT_PREC) * k_dec[:, None]
        tl.store(dk_base + r64 * sdkn + offs_k[None, :], dk.to(DK_.dtype.element_ty), mask=rmask[:, None] & kmask[None, :])
        DT = DT * tl.exp2(-sl2 * m.to(tl.float32)) + _mm(tl.trans((do * q_dec[:, None]).to(dt)), q, DOT_PREC)


@triton.autotune(configs=_configs(), key=["BK", "BV", "C", "HAS_D0", "STORE_DH0"], **_AUTOTUNE_KW)
@triton.jit
def _bwd_dv_kernel(
    Q, K, DO, DV_, SLOPE, D0, DH0,
    sqb, sqn, sqh, sqd, skb, skn, skh, skd, sdob, sdon, sdoh, sdod, sdvb, sdvn, sdvh,
    d0_bh, d0_s,
    N, H, NC, CPS,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    HAS_D0: tl.constexpr, STORE_DH0: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dv = ((K Q^T) * M^T) dO + lambda^(m-1-j) K dS: a reverse walk carrying dS [Dk, BV] (all of Dk, a Dv
    tile); segment 0's dS at its start is the gradient of the initial state."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_v = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    dt = Q.dtype.element_ty
    sl2 = tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    kmask = offs_k < DK
    vmask = offs_v < DV
    gap = (offs_c[None, :] - offs_c[:, None]).to(tl.float32)                      # [j, i]: i - j
    mask_t = tl.where(gap >= 0, tl.exp2(-sl2 * tl.maximum(gap, 0.0)), 0.0)
    q_dec = tl.exp2(-sl2 * (offs_c + 1).to(tl.float32))

    if HAS_D0:
        p_d = D0 + pid_bh.to(tl.int64) * d0_bh + pid_s.to(tl.int64) * d0_s
        D = tl.load(p_d + offs_k[:, None] * DV + offs_v[None, :], mask=kmask[:, None] & vmask[None, :], other=0.0)
    else:
        D = tl.zeros([BK, BV], dtype=tl.float32)

    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    do_base = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
    dv_base = DV_ + b.to(tl.int64) * sdvb + h.to(tl.int64) * sdvh
    c_lo, c_hi = _seg_bounds(pid_s, CPS, NC, C)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        rows = c * C + offs_c
        rmask = rows < N
        r64 = rows[:, None].to(tl.int64)
        q = tl.load(q_base + r64 * sqn + offs_k[None, :] * sqd, mask=rmask[:, None] & kmask[None, :], other=0.0)
        k = tl.load(k_base + r64 * skn + offs_k[None, :] * skd, mask=rmask[:, None] & kmask[None, :], other=0.0)
        do = tl.load(do_base + r64 * sdon + offs_v[None, :] * sdod, mask=rmask[:, None] & vmask[None, :], other=0.0)
        m = tl.minimum(N - c * C, C)
        k_dec = tl.where(offs_c < m, tl.exp2(-sl2 * (m - 1 - offs_c).to(tl.float32)), 0.0)
        at = _mm(k, tl.trans(q), DOT_PREC) * mask_t                                  # [j, i]
        dv = _mm(at.to(dt), do, DOT_PREC)
        dv += _mm(k, D.to(dt), DOT_PREC) * k_dec[:, None]
        tl.store(dv_base + r64 * sdvn + offs_v[None, :], dv.to(DV_.dtype.element_ty), mask=rmask[:, None] & vmask[None, :])
        D = D * tl.exp2(-sl2 * m.to(tl.float32)) + _mm(tl.trans((q * q_dec[:, None]).to(dt)), do, DOT_PREC)

    if STORE_DH0:
        if pid_s == 0:
            p_h = DH0 + pid_bh.to(tl.int64) * DK * DV
            tl.store(p_h + offs_k[:, None] * DV + offs_v[None, :], D, mask=kmask[:, None] & vmask[None, :])


_AUTOTUNED = [_seg_local_kernel, _fwd_kernel, _bwd_dq_kernel, _bwd_dk_kernel, _bwd_dv_kernel]


def _force_configs(configs=None):
    """Tests: make every autotuned kernel use exactly ``configs`` (None: the default space)."""
    for kern in _AUTOTUNED:
        kern.configs = list(configs) if configs is not None else _configs()
        kern.cache = {}


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------
def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _plan(B, N, H, DK, DV, C, device, num_segments=None):
    """Tile sizes and the number of segments (enough programs for ~2 waves of the GPU's SMs).
    Forward and dv walks hold all of Dk and a Dv tile (BVT); dq and dk walks hold all of Dv and a Dk tile (BKT)."""
    BKF = max(16, triton.next_power_of_2(DK))
    BVF = max(16, triton.next_power_of_2(DV))
    BVT = BVF if BKF <= 128 else min(64, BVF)
    BKT = min(128, BKF)
    NV = triton.cdiv(DV, BVT)
    NK = triton.cdiv(DK, BKT)
    NC = max(1, triton.cdiv(N, C))
    if num_segments is None:
        target = 2 * _num_sms(device)
        num_segments = max(1, min(NC, triton.cdiv(target, B * H * NV)))
    num_segments = max(1, min(int(num_segments), NC))
    CPS = triton.cdiv(NC, num_segments)
    NSEG = triton.cdiv(NC, CPS)
    return dict(BKF=BKF, BVF=BVF, BVT=BVT, BKT=BKT, NV=NV, NK=NK, NC=NC, CPS=CPS, NSEG=NSEG)


def _dot_prec(dtype):
    if _interpreting():
        return "up32" if dtype != torch.float32 else "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _check_inputs(q, k, v, slope, initial_state):
    for name, t in (("q", q), ("k", k), ("v", v), ("slope", slope)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lightning_attention_triton: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("lightning_attention_triton: q, k, v must be 4-D [B, N, H, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"lightning_attention_triton: dtype {q.dtype} not supported (float32, bfloat16, float16)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"lightning_attention_triton: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"lightning_attention_triton: q and k shapes differ: {tuple(q.shape)} vs {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"lightning_attention_triton: v's [B, N, H] {tuple(v.shape[:3])} != q's {tuple(q.shape[:3])}")
    B, N, H, DK = q.shape
    DV = v.shape[-1]
    if not (1 <= DK <= MAX_DK) or not (1 <= DV <= MAX_DV):
        raise ValueError(f"lightning_attention_triton: head dims Dk={DK}, Dv={DV} over the limits "
                         f"(Dk <= {MAX_DK}, Dv <= {MAX_DV})")
    if slope.dim() != 1 or slope.shape[0] != H:
        raise ValueError(f"lightning_attention_triton: slope must have shape [H] = [{H}], got {tuple(slope.shape)}")
    if not slope.is_floating_point():
        raise TypeError(f"lightning_attention_triton: slope must be a float tensor, got {slope.dtype}")
    devs = {t.device for t in (q, k, v, slope)}
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise TypeError("lightning_attention_triton: initial_state must be a torch.Tensor or None")
        if tuple(initial_state.shape) != (B, H, DK, DV):
            raise ValueError(f"lightning_attention_triton: initial_state must have shape {(B, H, DK, DV)}, "
                             f"got {tuple(initial_state.shape)}")
        if not initial_state.is_floating_point():
            raise TypeError(f"lightning_attention_triton: initial_state must be a float tensor, got {initial_state.dtype}")
        devs.add(initial_state.device)
    if len(devs) != 1:
        raise ValueError(f"lightning_attention_triton: all tensors must be on one device, got {sorted(map(str, devs))}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError("lightning_attention_triton: needs CUDA tensors (the CPU path is lightning_attention_chunk); "
                         f"got device {q.device}")


def _fwd(q, k, v, slope, s0, output_final_state, C, num_segments):
    B, N, H, DK = q.shape
    DV = v.shape[-1]
    P = _plan(B, N, H, DK, DV, C, q.device, num_segments)
    BK, BV, NV, NC, CPS, NSEG = P["BKF"], P["BVT"], P["NV"], P["NC"], P["CPS"], P["NSEG"]
    prec = _dot_prec(q.dtype)
    o = torch.empty(B, N, H, DV, dtype=v.dtype, device=q.device)
    sfin = torch.empty(B, H, DK, DV, dtype=torch.float32, device=q.device) if output_final_state else None
    sinit, s0_bh, s0_s = None, 0, 0
    if NSEG > 1:
        sinit = torch.empty(B * H, NSEG, DK, DV, dtype=torch.float32, device=q.device)
        if s0 is not None:
            sinit[:, 0] = s0.reshape(B * H, DK, DV)
        else:
            sinit[:, 0].zero_()
        _seg_local_kernel[(B * H, NSEG - 1, NV)](
            k, v, slope, sinit, *k.stride(), *v.stride(), N, H, NC, CPS, NSEG,
            DK=DK, DV=DV, BK=BK, BV=BV, C=C, REVERSE=False, DOT_PREC=prec)
        blk = min(1024, triton.next_power_of_2(DK * DV))
        _seg_scan_kernel[(B * H, triton.cdiv(DK * DV, blk))](
            sinit, slope, H, N, NSEG, CPS * C, DK * DV, REVERSE=False, BLOCK=blk)
        s0_bh, s0_s = NSEG * DK * DV, DK * DV
    elif s0 is not None:
        sinit = s0
        s0_bh, s0_s = DK * DV, 0
    _fwd_kernel[(B * H, NSEG, NV)](
        q, k, v, o, slope, sinit if sinit is not None else o, sfin if sfin is not None else o,
        *q.stride(), *k.stride(), *v.stride(), *o.stride()[:3], s0_bh, s0_s,
        N, H, NC, CPS, NSEG,
        DK=DK, DV=DV, BK=BK, BV=BV, C=C, HAS_S0=sinit is not None, STORE_FINAL=sfin is not None, DOT_PREC=prec)
    return o, sfin, sinit


def _bwd(q, k, v, slope, sinit, do, dht, need_dh0, C, num_segments):
    B, N, H, DK = q.shape
    DV = v.shape[-1]
    P = _plan(B, N, H, DK, DV, C, q.device, num_segments)
    NC, CPS, NSEG = P["NC"], P["CPS"], P["NSEG"]
    prec = _dot_prec(q.dtype)
    dev = q.device
    dq = torch.empty(B, N, H, DK, dtype=q.dtype, device=dev)
    dk = torch.empty(B, N, H, DK, dtype=k.dtype, device=dev)
    dv = torch.empty(B, N, H, DV, dtype=v.dtype, device=dev)
    dh0 = torch.empty(B, H, DK, DV, dtype=torch.float32, device=dev) if need_dh0 else None

    # dq: forward walk from the same segment initial states as the forward pass
    if sinit is None:
        s0_bh, s0_s = 0, 0
    elif NSEG > 1:
        s0_bh, s0_s = NSEG * DK * DV, DK * DV
    else:
        s0_bh, s0_s = DK * DV, 0
    _bwd_dq_kernel[(B * H, NSEG, P["NK"])](
        k, v, do, dq, slope, sinit if sinit is not None else dq,
        *k.stride(), *v.stride(), *do.stride(), *dq.stride()[:3], s0_bh, s0_s,
        N, H, NC, CPS,
        DK=DK, DV=DV, BK=P["BKT"], BV=P["BVF"], C=C, HAS_S0=sinit is not None, DOT_PREC=prec)

    # dk, dv: reverse walks; dS at each segment's end from a pre-pass and a reverse scan
    dinit, d0_bh, d0_s = None, 0, 0
    if NSEG > 1:
        dinit = torch.empty(B * H, NSEG, DK, DV, dtype=torch.float32, device=dev)
        if dht is not None:
            dinit[:, NSEG - 1] = dht.reshape(B * H, DK, DV)
        else:
            dinit[:, NSEG - 1].zero_()
        _seg_local_kernel[(B * H, NSEG - 1, P["NV"])](
            q, do, slope, dinit, *q.stride(), *do.stride(), N, H, NC, CPS, NSEG,
            DK=DK, DV=DV, BK=P["BKF"], BV=P["BVT"], C=C, REVERSE=True, DOT_PREC=prec)
        blk = min(1024, triton.next_power_of_2(DK * DV))
        _seg_scan_kernel[(B * H, triton.cdiv(DK * DV, blk))](
            dinit, slope, H, N, NSEG, CPS * C, DK * DV, REVERSE=True, BLOCK=blk)
        d0_bh, d0_s = NSEG * DK * DV, DK * DV
    elif dht is not None:
        dinit = dht
        d0_bh, d0_s = DK * DV, 0
    _bwd_dk_kernel[(B * H, NSEG, P["NK"])](
        q, v, do, dk, slope, dinit if dinit is not None else dk,
        *q.stride(), *v.stride(), *do.stride(), *dk.stride()[:3], d0_bh, d0_s,
        N, H, NC, CPS,
        DK=DK, DV=DV, BK=P["BKT"], BV=P["BVF"], C=C, HAS_D0=dinit is not None, DOT_PREC=prec)
    _bwd_dv_kernel[(B * H, NSEG, P["NV"])](
        q, k, do, dv, slope, dinit if dinit is not None else dv, dh0 if dh0 is not None else dv,
        *q.stride(), *k.stride(), *do.stride(), *dv.stride()[:3], d0_bh, d0_s,
        N, H, NC, CPS,
        DK=DK, DV=DV, BK=P["BKF"], BV=P["BVT"], C=C, HAS_D0=dinit is not None, STORE_DH0=dh0 is not None,
        DOT_PREC=prec)
    return dq, dk, dv, dh0


class LightningAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, initial_state, output_final_state, chunk_size, num_segments):
        s0 = None
        if initial_state is not None:
            s0 = initial_state.detach().to(torch.float32).contiguous()
        slope32 = slope.detach().to(torch.float32).contiguous()
        o, sfin, sinit = _fwd(q, k, v, slope32, s0, output_final_state, chunk_size, num_segments)
        ctx.save_for_backward(q, k, v, slope32, sinit)
        ctx.has_s0 = initial_state is not None
        ctx.s0_dtype = initial_state.dtype if initial_state is not None else None
        ctx.chunk_size = chunk_size
        ctx.num_segments = num_segments
        ctx.set_materialize_grads(False)
        if sfin is not None:
            return o, sfin
        return o

    @staticmethod
    def backward(ctx, do, dht=None):
        q, k, v, slope32, sinit = ctx.saved_tensors
        if do is None:
            do = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=v.dtype, device=v.device)
        if do.dtype != v.dtype:
            do = do.to(v.dtype)
        if dht is not None:
            dht = dht.to(torch.float32).contiguous()
        need_dh0 = ctx.has_s0 and ctx.needs_input_grad[4]
        dq, dk, dv, dh0 = _bwd(q, k, v, slope32, sinit, do, dht, need_dh0, ctx.chunk_size, ctx.num_segments)
        if dh0 is not None and ctx.s0_dtype != torch.float32:
            dh0 = dh0.to(ctx.s0_dtype)
        return dq, dk, dv, None, dh0, None, None, None


def lightning_attention_triton(q, k, v, slope, initial_state=None, output_final_state: bool = True,
                               chunk_size: int = 64, num_segments=None):
    """Causal decayed linear attention with Triton kernels. Returns (o [B, N, H, Dv] in v's dtype,
    final_state [B, H, Dk, Dv] fp32, or None when output_final_state is False).

    q, k [B, N, H, Dk] (Dk <= 256), v [B, N, H, Dv] (Dv <= 128), one dtype among float32 / bfloat16 /
    float16, any strides; slope [H] (lambda = exp(-slope), slope >= 0); initial_state [B, H, Dk, Dv] or None.
    Gradients flow to q, k, v and initial_state (not to slope, a fixed buffer in the model).
    ``chunk_size`` (a power of two, 16..128) and ``num_segments`` (None: chosen to fill the GPU) are tuning
    knobs; the result does not depend on them beyond rounding.
    """
    _check_inputs(q, k, v, slope, initial_state)
    if chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"lightning_attention_triton: chunk_size must be 16, 32, 64 or 128, got {chunk_size}")
    B, N, H, DK = q.shape
    DV = v.shape[-1]
    if N == 0 or B == 0 or H == 0:
        o = v.new_zeros(B, N, H, DV)
        fin = None
        if output_final_state:
            fin = (initial_state.to(torch.float32).clone() if initial_state is not None
                   else torch.zeros(B, H, DK, DV, dtype=torch.float32, device=q.device))
        return o, fin
    out = LightningAttentionFunction.apply(q, k, v, slope, initial_state, bool(output_final_state),
                                           int(chunk_size), num_segments)
    if output_final_state:
        return out
    return out, None


__all__ = ["lightning_attention_triton", "LightningAttentionFunction", "MAX_DK", "MAX_DV"]
