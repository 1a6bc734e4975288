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
  The number of segments is picked so that the grid fills the GPU whatever B and N are, with as few segments
  as pay (each but the last costs the pre-pass a read of its tokens; see _plan); the pre-pass cuts each
  segment into pieces for the same reason (it has a program per segment but the last). It reads only the
  tokens whose decay to the segment's edge is at least 2^-160 (ZERO_DECAY_LOG2: below that, fp32's factor is
  zero): with steep decays, the end of each segment (forward) or its start (backward), not all of it.
* Backward: three more walks, with the same segment pre-pass and scan: a forward walk for dq (carrying S^T,
  tiled over Dk), and reverse walks for dk (carrying dS^T, tiled over Dk) and dv (carrying dS, tiled over Dv),
  where dS is the gradient of the state. The gradient of the final state seeds the reverse walks; the dv walk's
  dS after segment 0 is the gradient of the initial state. All four walks have one form (out = masked
  X Y^T times Z plus X times the carried state), so one kernel, ``_walk_kernel``, runs them all. The transposed
  intra-chunk products are formed from the loaded tiles: no matrix-unit result is transposed in registers and
  fed to another product, the pattern Triton 3.4 to 3.7.0 miscompiles on Hopper (fla issue #640).
* fp32 accumulation everywhere, fp32 states; matrix-unit operands in the input dtype (fp32 inputs use
  ``tf32x3``, about fp32 accuracy).
* On Hopper with Triton 3.6, the walks of 16-bit inputs whose X and Y are 128 wide run in Gluon instead
  (gluon_walk.py: the next chunk's copies issued by hand at the start of each chunk), the same math at the same
  errors; ``_walk`` picks, and asks for the o and dq walks as programs holding both Z tiles where those fill the
  GPU (_both_tiles_fill). TNLLM_GLUON_WALKS=0 turns them off.

Measured on one H200 (benchmarks/RESULTS.md, issue 14, twenty-fourth session): bf16, H=16, D=128, 32768 tokens,
fwd+bwd replayed from a CUDA graph 0.62 to 0.73 ms (N = 1k..32k) against 1.65 to 2.45 ms for fla 0.6.0
chunk_simple_gla, at the GPU's 700 W power cap. Of that, the four walks took about 600 us of GPU time with the Gluon
walks before the two-tile programs (twentieth session), and 770-789 us with the Triton walks (eighteenth session).
On one H100 (issue 3, Triton walks): 1.2 to 1.8 ms against 2.2 to 2.7 ms for fla, at half its peak memory.
"""
import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from .._interpreter import interpreting
from .._l2 import prefetch_l2

try:        # Hopper's walks in Gluon, for the Triton release whose Gluon API they are written in (gluon_walk.py)
    from . import gluon_walk as _gluon_walk
except (ImportError, AttributeError):
    _gluon_walk = None

MAX_DK = 256
MAX_DV = 128
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# keep autotuning results in Triton's cache directory where this Triton can (saves re-tuning in a new process)
_AUTOTUNE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _configs(extra=None):
    """A small autotuning space (warps x pipelining depth); a single config in the interpreter."""
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    if os.environ.get("TNLLM_TRITON_AUTOTUNE", "1") == "0":      # one config, e.g. for quick GPU tests
        return [triton.Config({}, num_warps=8, num_stages=2)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (8, 1), (8, 2))]


def _warps_for_tiles(width_a, width_b):
    """An early_config_prune for autotune: where a tile (the walk's BX, BZ; the pre-pass's BK, BV) is narrower than
    64, the one config 4 warps x 2 stages; wider tiles keep the whole space. Why: with Triton 3.6 on an H200 these
    narrow tiles made illegal memory accesses at other configs: the fp32 forward walk with 16 x 16 tiles (heads of
    16, chunk 64) at 8 warps, and the bf16 walks of heads of 32 (64 x 32 tiles with LRPE) at 8 warps x 1 stage, and
    in a model's first forward after 8-warp configs were pruned to 4 warps, so at 4 x 1 as well, not isolated; 4 x 2
    ran every one of those shapes right (2026-11-29; benchmarks/RESULTS.md). Narrow heads gain little from tuning."""
    def prune(configs, named_args, **kwargs):
        if min(kwargs[width_a], kwargs[width_b]) >= 64:
            return configs
        return [triton.Config({}, num_warps=4, num_stages=2)]
    return {"early_config_prune": prune}


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
def _seg_bounds(seg, CPS, NC):
    """Chunks [c_lo, c_hi) of segment seg: CPS chunks, the last segment cut at NC."""
    c_lo = seg * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    return c_lo, c_hi


@triton.jit
def _piece_bounds(seg, p, CPS, CPSS, NC):
    """Chunks [c_lo, c_hi) of piece p of segment seg (the pre-pass's unit): CPSS chunks from the segment's start
    + p * CPSS, cut at the segment's end; empty (c_lo == c_hi) past it."""
    seg_lo, seg_hi = _seg_bounds(seg, CPS, NC)
    c_lo = tl.minimum(seg_lo + p * CPSS, seg_hi)
    c_hi = tl.minimum(c_lo + CPSS, seg_hi)
    return c_lo, c_hi


@triton.jit
def _chunks_tokens(c_lo, c_hi, N, C: tl.constexpr):
    """How many of the N tokens chunks [c_lo, c_hi) hold (the last chunk may be partial; 0 for an empty range)."""
    return tl.maximum(tl.minimum(c_hi * C, N) - c_lo * C, 0)


# A token whose decay to its segment's edge is below 2^-160 adds nothing there that fp32 can hold: the factor itself
# is zero in fp32 (under its smallest subnormal, 2^-149), and the token's product with it, taken exactly, lies under
# the rounding of any sum holding a term over 2^-136 of the token's size. The pre-pass skips such tokens
# (_chunks_reaching_the_edge); the walks, which carry the state token by token, read every token anyway.
ZERO_DECAY_LOG2 = tl.constexpr(160.0)


@triton.jit
def _chunks_reaching_the_edge(seg, c_lo, c_hi, sl2, CPS, NC, N, C: tl.constexpr, REVERSE: tl.constexpr):
    """The chunks [c_first, c_end) of [c_lo, c_hi) (a pre-pass piece of segment seg) holding a token whose decay
    to the segment's edge, lambda^(seg_end - 1 - t) forward or lambda^(t + 1 - seg_start) backward, is at least
    2^-ZERO_DECAY_LOG2; a chunk more on the far side, so that fp32 rounding of the bound never drops one. With
    slope 0 (sl2 = 0), all of them."""
    seg_lo, seg_hi = _seg_bounds(seg, CPS, NC)
    reach = ZERO_DECAY_LOG2 / tl.maximum(sl2, 1e-30)       # tokens; past N where sl2 is 0 or tiny
    # clamped to the piece in floats, before the integer: the bound can be far past any chunk index (an empty
    # range, c_first >= c_end, is a piece with nothing to read)
    if REVERSE:
        stop = tl.floor((seg_lo * C + reach) / C) + 2.0
        c_first = c_lo
        c_end = tl.minimum(stop, c_hi.to(tl.float32)).to(tl.int32)
    else:
        start = tl.floor((tl.minimum(seg_hi * C, N) - reach) / C) - 1.0
        c_first = tl.maximum(start, c_lo.to(tl.float32)).to(tl.int32)
        c_end = c_hi
    return c_first, c_end


@triton.jit
def _log2_decay(SLOPE, h):
    """slope[h] * log2(e): lambda^n = exp2(-n * this)."""
    return tl.load(SLOPE + h).to(tl.float32) * 1.4426950408889634


@triton.jit
def _head(X, b, h, s_b, s_h):
    """Pointer to token 0, feature 0 of (batch b, head h) in a [B, N, H, D] tensor."""
    return X + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h


@triton.jit
def _load_rows(base, rows, s_n, cols, s_d, rmask, cmask):
    """The [rows, cols] tile of one head (zeros outside the masks)."""
    return tl.load(base + rows[:, None].to(tl.int64) * s_n + cols[None, :] * s_d,
                   mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _store_rows(base, rows, s_n, cols, x, rmask, cmask):
    """Store a [rows, cols] tile into an output allocated contiguous in its last dim, in the output's dtype."""
    tl.store(base + rows[:, None].to(tl.int64) * s_n + cols[None, :], x.to(base.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _prefetch_rows(base, rows, s_n, s_d, W: tl.constexpr, BW: tl.constexpr):
    """Ask L2 for the given rows of one head's [N, W] tile (BW: the tile's width in the kernel), one prefetch per
    128-byte line. The rows must lie inside the tensor."""
    STEP: tl.constexpr = max(1, 128 // (base.dtype.element_ty.primitive_bitwidth // 8))
    cols = tl.minimum(tl.arange(0, max(1, BW // STEP)) * STEP, W - 1)
    prefetch_l2(base + rows[:, None].to(tl.int64) * s_n + cols[None, :] * s_d)


@triton.jit
def _chunk_mask(sl2, offs_c, TRANSPOSED: tl.constexpr):
    """M[i, j] = lambda^(i - j) for j <= i, else 0 (the causal decay inside a chunk, the same for every chunk);
    M^T ([j, i]) when TRANSPOSED."""
    if TRANSPOSED:
        gap = (offs_c[None, :] - offs_c[:, None]).to(tl.float32)
    else:
        gap = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
    return tl.where(gap >= 0, tl.exp2(-sl2 * tl.maximum(gap, 0.0)), 0.0)


@triton.jit
def _query_decay(sl2, offs_c):
    """lambda^(i + 1): what the state entering a chunk contributes to its row i."""
    return tl.exp2(-sl2 * (offs_c + 1).to(tl.float32))


@triton.jit
def _key_decay(sl2, offs_c, m):
    """lambda^(m - 1 - j) for the chunk's m valid rows (its key's weight in the state leaving it), 0 after."""
    return tl.where(offs_c < m, tl.exp2(-sl2 * (m - 1 - offs_c).to(tl.float32)), 0.0)


@triton.jit
def _state_ptrs(P, rows, cols, DV, STATE_T: tl.constexpr):
    """Element (r, c) of a walk's state in an fp32 [Dk, Dv] buffer: S[r, c], or S[c, r] when the walk carries the
    transpose (STATE_T)."""
    if STATE_T:
        ptrs = P + rows[:, None] + cols[None, :] * DV
    else:
        ptrs = P + rows[:, None] * DV + cols[None, :]
    return ptrs


# ----------------------------------------------------------------------------------------------------------
# segment pre-pass: each segment's own contribution to the state at its end (forward) or start (backward)
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=["BK", "BV", "C", "REVERSE"], prune_configs_by=_warps_for_tiles("BK", "BV"),
                 **_AUTOTUNE_KW)
@triton.jit
def _seg_local_kernel(
    A, Bm, SLOPE, SUB,
    sab, san, sah, sad, sbb, sbn, sbh, sbd,
    N, H, NC, CPS, NSEG, SPLITS, CPSS,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, DOT_PREC: tl.constexpr, PREFETCH: tl.constexpr,
):
    """Each segment that feeds another is cut into SPLITS pieces of CPSS chunks (the last ones shorter or empty):
    one program per piece, so that short pre-passes still fill the GPU. Forward (REVERSE=0): A=k, Bm=v; piece p of
    segment s < NSEG-1 gets sum_t lambda^(E_p-1-t) k_t v_t^T (E_p: the piece's end). Backward (REVERSE=1): A=q,
    Bm=do; piece p of segment s >= 1 gets sum_t lambda^(t+1-T_p) q_t do_t^T (T_p: its start). The sums run over
    the piece's chunks that reach the segment's edge (_chunks_reaching_the_edge), the others adding zero. Written to
    SUB[b*h, i] with i = program_id(1) = (s - REVERSE) * SPLITS + p; _seg_scan_kernel sums the pieces."""
    pid_bh = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_v = tl.program_id(2)
    pid_s = pid_i // SPLITS + REVERSE
    c_lo, c_hi = _piece_bounds(pid_s, pid_i % SPLITS, CPS, CPSS, NC)
    b = pid_bh // H
    h = pid_bh % H
    sl2 = _log2_decay(SLOPE, h)
    t_lo = c_lo * C
    t_hi = tl.minimum(c_hi * C, N)
    c_first, c_end = _chunks_reaching_the_edge(pid_s, c_lo, c_hi, sl2, CPS, NC, N, C, REVERSE)
    offs_c = tl.arange(0, C)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    kmask = offs_k < DK
    vmask = offs_v < DV
    a_base = _head(A, b, h, sab, sah)
    b_base = _head(Bm, b, h, sbb, sbh)
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(c_first, c_end):
        rows = c * C + offs_c
        rmask = rows < N
        if PREFETCH:        # the next chunk (see _walk_kernel)
            rows_next = tl.minimum(tl.minimum(c + 1, c_end - 1) * C + offs_c, N - 1)
            _prefetch_rows(a_base, rows_next, san, sad, DK, BK)
            _prefetch_rows(b_base + pid_v * BV * sbd, rows_next, sbn, sbd, DV - pid_v * BV, BV)
        a = _load_rows(a_base, rows, san, offs_k, sad, rmask, kmask)
        bb = _load_rows(b_base, rows, sbn, offs_v, sbd, rmask, vmask)
        if REVERSE:
            dec = tl.exp2(-sl2 * (rows - t_lo + 1).to(tl.float32))
        else:
            dec = tl.exp2(-sl2 * (t_hi - 1 - rows).to(tl.float32))
        dec = tl.where(rmask, dec, 0.0)
        a = (a * dec[:, None]).to(A.dtype.element_ty)
        acc += _mm(tl.trans(a), bb, DOT_PREC)
    if c_first < c_end:     # a piece that reaches nothing is left unwritten; the scan does not read it either
        out = SUB + ((pid_bh.to(tl.int64) * (NSEG - 1) * SPLITS + pid_i) * DK) * DV
        tl.store(_state_ptrs(out, offs_k, offs_v, DV, False), acc, mask=kmask[:, None] & vmask[None, :])


@triton.jit
def _fold_pieces(run, sub_seg, seg, j0, SPLITS, CPS, CPSS, N, sl2, offs, m, DKDV, C: tl.constexpr,
                 REVERSE: tl.constexpr, U: tl.constexpr):
    """run carried across U pieces of segment seg, the j0-th to the (j0 + U - 1)-th in the order of the scan (reverse:
    last piece first; those past SPLITS are none): run * lambda^(their tokens) + sum_u piece_u * lambda^(the tokens
    of the pieces after u). Loaded as one [U, BLOCK] tile, the U pieces are in flight together: folded one load at a
    time, the scan was a chain of (NSEG - 1) * SPLITS loads, bound by their latency."""
    j = j0 + tl.arange(0, U)
    live = j < SPLITS
    if REVERSE:
        p = tl.where(live, SPLITS - 1 - j, 0)
    else:
        p = tl.where(live, j, 0)
    NC = (N + C - 1) // C
    c_lo, c_hi = _piece_bounds(seg, p, CPS, CPSS, NC)
    n_tok = tl.where(live, _chunks_tokens(c_lo, c_hi, N, C), 0)
    total = tl.sum(n_tok, axis=0)
    after = (total - tl.cumsum(n_tok, axis=0)).to(tl.float32)         # tokens of the pieces folded after u
    # only the pieces the pre-pass wrote: those with a chunk that reaches the edge (at the table's slopes about half)
    c_first, c_end = _chunks_reaching_the_edge(seg, c_lo, c_hi, sl2, CPS, NC, N, C, REVERSE)
    read = live & (c_first < c_end)
    x = tl.load(sub_seg + p[:, None] * DKDV + offs[None, :], mask=read[:, None] & m[None, :], other=0.0)
    return run * tl.exp2(-sl2 * total.to(tl.float32)) + tl.sum(x * tl.exp2(-sl2 * after)[:, None], axis=0)


@triton.jit
def _seg_scan_kernel(SUB, EDGE, OUT, SLOPE, H, N, NSEG, SPLITS, CPS, CPSS, DKDV, C: tl.constexpr,
                     HAS_EDGE: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr, U: tl.constexpr):
    """Elementwise over the Dk*Dv entries: the pieces' contributions SUB [B*H, (NSEG-1)*SPLITS, Dk*Dv] into
    OUT [B*H, NSEG, Dk*Dv]. Forward: OUT[0] = S_0 (EDGE [B*H, Dk*Dv], or 0 without HAS_EDGE), OUT[s] the state
    entering segment s. Reverse: OUT[NSEG-1] = dS_N (EDGE, or 0), OUT[s] dS at the end of segment s. A running
    state, decayed over each piece's length, plus the piece's contribution, in sequence order (reverse: backwards),
    U pieces at a time (_fold_pieces)."""
    pid_bh = tl.program_id(0)
    pid_e = tl.program_id(1)
    h = pid_bh % H
    sl2 = _log2_decay(SLOPE, h)
    offs = pid_e * BLOCK + tl.arange(0, BLOCK)
    m = offs < DKDV
    sub = SUB + pid_bh.to(tl.int64) * (NSEG - 1) * SPLITS * DKDV
    out = OUT + pid_bh.to(tl.int64) * NSEG * DKDV + offs
    if HAS_EDGE:
        run = tl.load(EDGE + pid_bh.to(tl.int64) * DKDV + offs, mask=m, other=0.0)
    else:
        run = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(out + (NSEG - 1 if REVERSE else 0) * DKDV, run, mask=m)
    for i in range(0, NSEG - 1):
        k = NSEG - 2 - i if REVERSE else i      # SUB's k-th segment of pieces: segment k + REVERSE's, folded into
        for j0 in range(0, SPLITS, U):          # the state leaving it (OUT[k + 1]; reverse: OUT[k], entering it)
            run = _fold_pieces(run, sub + k * SPLITS * DKDV, k + REVERSE, j0, SPLITS, CPS, CPSS, N, sl2, offs, m,
                               DKDV, C, REVERSE, U)
        tl.store(out + (k if REVERSE else k + 1) * DKDV, run, mask=m)


# ----------------------------------------------------------------------------------------------------------
# The two walks. Each program owns one (batch*head, segment, tile of Z's features) and walks its segment's
# chunks carrying an fp32 state T [width of X, Z tile], starting from the segment's state (pre-pass + scan).
#
#   forward walk:  out = ((X Y^T) * M) Z + lambda^(i+1) X T,        T <- lambda^m T + Y^T (lambda^(m-1-j) Z)
#   reverse walk:  out = ((X Y^T) * M^T) Z + lambda^(m-1-j) X T,    T <- lambda^m T + (lambda^(i+1) Y)^T Z
#
#   o  = forward walk (X, Y, Z) = (q, k, v),   T = S          [Dk, Dv tile]   (the forward pass)
#   dq = forward walk (dO, v, k),              T = S^T        [Dv, Dk tile]
#   dk = reverse walk (v, dO, q),              T = dS^T       [Dv, Dk tile]
#   dv = reverse walk (k, q, dO),              T = dS         [Dk, Dv tile]; at segment 0's start, dS_0
#
# Every transposed product is formed from loaded tiles: no matrix-unit result is transposed in registers and
# fed to another product (the pattern Triton 3.4 to 3.7.0 miscompiles on Hopper, fla issue #640).
# ----------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_configs(), key=["BX", "BZ", "C", "REVERSE", "STATE_T", "HAS_T0", "STORE_T"],
                 prune_configs_by=_warps_for_tiles("BX", "BZ"), **_AUTOTUNE_KW)
@triton.jit
def _walk_kernel(
    X, Y, Z, OUT, SLOPE, T0, TOUT,
    sxb, sxn, sxh, sxd, syb, syn, syh, syd, szb, szn, szh, szd, sob, son, soh,
    t0_bh, t0_s,
    N, H, NC, CPS, NSEG,
    WX: tl.constexpr, WZ: tl.constexpr, DV: tl.constexpr, BX: tl.constexpr, BZ: tl.constexpr, C: tl.constexpr,
    REVERSE: tl.constexpr, STATE_T: tl.constexpr, HAS_T0: tl.constexpr, STORE_T: tl.constexpr,
    DOT_PREC: tl.constexpr, PREFETCH: tl.constexpr,
):
    """X and Y have WX features (all held), Z and OUT have WZ (this program's BZ tile). T0: each segment's
    starting state (t0_bh, t0_s: strides per batch*head and per segment). STORE_T: the state the walk ends with,
    into TOUT [B*H, Dk, Dv] (the forward pass's final state; the dv walk's gradient of the initial state).
    PREFETCH: ask L2 for the next chunk's rows at the start of each chunk. Triton 3.6's two-stage pipeline issues
    the next chunk's loads only at the end of the current one, after its last product (sm_90 SASS), so each chunk
    began by waiting for HBM: 29% of the walk's stall samples in Nsight Compute. From L2 that wait is shorter."""
    NZ: tl.constexpr = (WZ + BZ - 1) // BZ
    pid_bh = tl.program_id(0) // NZ
    pid_z = tl.program_id(0) % NZ
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    dt = X.dtype.element_ty
    sl2 = _log2_decay(SLOPE, h)
    offs_c = tl.arange(0, C)
    offs_x = tl.arange(0, BX)
    offs_z = pid_z * BZ + tl.arange(0, BZ)
    xmask = offs_x < WX
    zmask = offs_z < WZ
    tmask = xmask[:, None] & zmask[None, :]
    mask = _chunk_mask(sl2, offs_c, REVERSE)
    q_dec = _query_decay(sl2, offs_c)
    if HAS_T0:
        t0 = T0 + pid_bh.to(tl.int64) * t0_bh + pid_s.to(tl.int64) * t0_s
        T = tl.load(_state_ptrs(t0, offs_x, offs_z, DV, STATE_T), mask=tmask, other=0.0)
    else:
        T = tl.zeros([BX, BZ], dtype=tl.float32)

    x_base = _head(X, b, h, sxb, sxh)
    y_base = _head(Y, b, h, syb, syh)
    z_base = _head(Z, b, h, szb, szh)
    o_base = _head(OUT, b, h, sob, soh)
    c_lo, c_hi = _seg_bounds(pid_s, CPS, NC)
    for i in range(0, c_hi - c_lo):
        if REVERSE:
            c = c_hi - 1 - i
        else:
            c = c_lo + i
        rows = c * C + offs_c
        rmask = rows < N
        if PREFETCH:
            if REVERSE:
                c_next = tl.maximum(c - 1, c_lo)
            else:
                c_next = tl.minimum(c + 1, c_hi - 1)
            rows_next = tl.minimum(c_next * C + offs_c, N - 1)
            _prefetch_rows(x_base, rows_next, sxn, sxd, WX, BX)
            _prefetch_rows(y_base, rows_next, syn, syd, WX, BX)
            _prefetch_rows(z_base + pid_z * BZ * szd, rows_next, szn, szd, WZ - pid_z * BZ, BZ)
        x = _load_rows(x_base, rows, sxn, offs_x, sxd, rmask, xmask)
        y = _load_rows(y_base, rows, syn, offs_x, syd, rmask, xmask)
        z = _load_rows(z_base, rows, szn, offs_z, szd, rmask, zmask)
        m = tl.minimum(N - c * C, C)
        k_dec = _key_decay(sl2, offs_c, m)
        yt = tl.trans(y)
        out = _mm((_mm(x, yt, DOT_PREC) * mask).to(dt), z, DOT_PREC)
        if REVERSE:
            out += _mm(x, T.to(dt), DOT_PREC) * k_dec[:, None]
            if STATE_T:
                # dk's walk: (diag(q_dec) Y)^T Z as Y^T (diag(q_dec) Z), the smaller Z tile (q) scaled and Y's
                # transpose shared with the score product (sm_90: no register spill)
                update = _mm(yt, (z * q_dec[:, None]).to(dt), DOT_PREC)
            else:
                # dv's walk rounds the decayed Y (q) rather than the decayed Z (dO): with q through silu (positive on
                # average) that keeps dv's error lower (benchmarks/RESULTS.md, tenth session)
                update = _mm(tl.trans((y * q_dec[:, None]).to(dt)), z, DOT_PREC)
        else:
            out += _mm(x, T.to(dt), DOT_PREC) * q_dec[:, None]
            update = _mm(yt, (z * k_dec[:, None]).to(dt), DOT_PREC)
        _store_rows(o_base, rows, son, offs_z, out, rmask, zmask)
        T = T * tl.exp2(-sl2 * m.to(tl.float32)) + update

    if STORE_T:
        if REVERSE:
            last = 0
        else:
            last = NSEG - 1
        if pid_s == last:       # the segment where the whole walk ends
            tout = TOUT + pid_bh.to(tl.int64) * WX * WZ
            tl.store(_state_ptrs(tout, offs_x, offs_z, DV, STATE_T), T, mask=tmask)


_AUTOTUNED = [_seg_local_kernel, _walk_kernel]


def _force_configs(configs=None):
    """Tests: make every autotuned kernel use exactly ``configs`` (None: the default space)."""
    for kern in _AUTOTUNED:
        kern.configs = list(configs) if configs is not None else _configs()
        kern.cache = {}
    _TUNED.clear()


# (kernel, its constexpr arguments, the tensors' dtypes) -> the autotuned config's launch options
_TUNED = {}


def _launch(kernel, grid, args, meta):
    """``kernel[grid](*args, **meta)`` for an autotuned kernel. The first launch for given constexprs and dtypes
    goes through the autotuner; later ones go straight to the compiled function with the config it chose, because
    Autotuner.run (dicts and lookups over the ~40 arguments on every call) took ~50 us of host time a launch on an
    H200 machine, as much as the launch itself, and forward+backward is 4 to 10 launches (benchmarks/RESULTS.md).
    The key holds every constexpr and every dtype, a superset of the autotuner's own key, so the config is the one
    the autotuner would pick."""
    key = (kernel, tuple(meta.items()), tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    options = _TUNED.get(key)
    if options is None:
        kernel[grid](*args, **meta)
        _TUNED[key] = kernel.best_config.all_kwargs()
    else:
        kernel.fn[grid](*args, **meta, **options)


# ----------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=1024)
def _plan(B, N, H, DK, DV, C, sms, num_segments=None, pre_splits=None, one_an_sm=False):
    """Tile sizes, the number of segments and the pre-pass's pieces for a GPU of ``sms`` SMs (cached: a pure
    function of its arguments; callers only read the dict).

    The walks carry a state tile of at most 128 x 64 in fp32 (the walks carrying S or dS hold all of Dk and a Dv
    tile BVT, those carrying a transpose hold all of Dv and a Dk tile BKT): at 4 warps that is two programs an SM,
    and one program's latency (its chain of small products) hides behind the other's. Holding all of Dv in one
    program of 8 warps, one an SM, took 11-15% longer at the same work on an H200 (benchmarks/RESULTS.md).
    The pre-pass holds a whole Dk x Dv state where it fits (at most 128 x 128: it only reads, once per chunk).

    Segments: enough programs for one round of those two slots an SM and no more (the floor, not the ceiling:
    a few programs past a whole round cost a second round of the same length). With ``one_an_sm`` (where the
    Gluon walks run: measured for them only), one program an SM where that takes at most two segments. Every
    segment but the last costs the pre-pass a read of its tokens' k, v (forward) and q, dO (backward), and time on
    the GPU is bound by its 700 W power cap when the attention runs back to back, as in training: there a walk
    alone on its SM loses less than that read costs. Measured on one H200, bf16, H=16, D=128, 32768 tokens,
    replayed back to back (benchmarks/RESULTS.md, twentieth session): at N=8192 one segment instead of two, 0.703
    against 0.765 ms; at 16384 two instead of four, 0.779 against 0.809; at 32768 four instead of eight was no
    faster (0.836 / 0.835), and 6% slower in short runs. Where one program an SM takes two segments, twice as many
    segments walked by programs holding both Z tiles (_both_tiles_fill) fill the SMs too: at N=16384, four segments
    so were 0.781 and 0.784 ms against 0.794 and 0.797 for two (twenty-second session, two runs): the two-tile
    programs' shared loads and score products save more than the pre-pass's second quarter of the tokens costs.

    Pre-pass pieces (SPLITS per segment, CPSS chunks each): the pre-pass has a program per segment but the last,
    B*H*(NSEG-1) of them, each walking a whole segment: at 32768 tokens as B=1 x N=32768 that was 112 programs of
    64 chunks on 132 SMs, as long as a walk. Cutting each segment into pieces gives it twice as many programs as
    the walks' two slots an SM, each a shorter chain; the scan adds the pieces up. Twice, because the pre-pass
    skips the tokens whose decay to the edge is zero (_chunks_reaching_the_edge): a steep head's pieces are empty
    but the one at the edge, and the gentle heads', read whole, set its length. Measured on one H200 (twenty-third
    session; bf16, H=16, 32768 tokens), twice the pieces took the pre-pass from 135 to 93 us at N=16384 and from 132
    to 113 us at 32768, and the scan, then one load a piece, from 13 to 19 and from 20 to 33 us (_fold_pieces
    brought it back to 16 and 20). A piece that reaches nothing is neither stored nor read by the scan: pre-pass
    100 -> 81 and 114 -> 106 us, scan 17 -> 12 and 20 -> 15 us (twenty-fourth session)."""
    BKF = max(16, triton.next_power_of_2(DK))
    BVF = max(16, triton.next_power_of_2(DV))
    BVT = min(64, BVF)
    BKT = min(64, BKF)
    BVP = BVF if BKF <= 128 else BVT
    NV = triton.cdiv(DV, BVT)
    NK = triton.cdiv(DK, BKT)
    NVP = triton.cdiv(DV, BVP)
    NC = max(1, triton.cdiv(N, C))
    slots = 2 * sms
    if num_segments is None:
        per_segment = B * H * max(NV, NK)       # a walk's programs for one segment
        num_segments = max(1, slots // per_segment)
        if one_an_sm and sms // per_segment <= 2:
            num_segments = max(1, sms // per_segment)
            # twice the segments, walked by programs holding both Z tiles (where there are two), one an SM
            if num_segments == 2 and max(NV, NK) == 2 and _both_tiles_fill(B * H * 2 * num_segments, sms):
                num_segments = 2 * num_segments
    num_segments = max(1, min(int(num_segments), NC))
    CPS = triton.cdiv(NC, num_segments)
    NSEG = triton.cdiv(NC, CPS)
    if pre_splits is None:
        pre_splits = 2 * (slots // max(1, B * H * (NSEG - 1) * NVP))
    SPLITS = max(1, min(int(pre_splits), CPS))
    CPSS = triton.cdiv(CPS, SPLITS)
    return dict(BKF=BKF, BVF=BVF, BVT=BVT, BKT=BKT, BVP=BVP, NV=NV, NK=NK, NVP=NVP, NC=NC, CPS=CPS, NSEG=NSEG,
                SPLITS=SPLITS, CPSS=CPSS)


def _dot_prec(dtype):
    if interpreting():
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
    if q.device.type != "cuda" and not interpreting():
        raise ValueError("lightning_attention_triton: needs CUDA tensors (the CPU path is lightning_attention_chunk); "
                         f"got device {q.device}")


def _segment_strides(P, DK, DV):
    """Strides (per batch*head, per segment) of the states the walks start from: a [B*H, NSEG, Dk, Dv] buffer
    with several segments, else the [B, H, Dk, Dv] edge state itself."""
    return (P["NSEG"] * DK * DV, DK * DV) if P["NSEG"] > 1 else (DK * DV, 0)


def _pieces_buffer(shape, device):
    """The pre-pass's output, uninitialised: it writes only the pieces with a chunk that reaches their segment's
    edge, and the scan reads only those. A function, so that a test can fill it with NaN."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _segment_states(a, b, slope, edge, P, C, prec, reverse):
    """The state each segment's walk starts from, as (buffer or None, stride per batch*head, stride per segment).
    Forward (a, b = k, v; edge = S_0 or None): the state entering each segment. Reverse (a, b = q, dO; edge =
    dS_N or None): dS at each segment's end. Several segments: the pre-pass and the scan; one: edge itself."""
    B, N, H, DK = a.shape
    DV = b.shape[-1]
    NSEG = P["NSEG"]
    if NSEG == 1:
        return (edge, *_segment_strides(P, DK, DV)) if edge is not None else (None, 0, 0)
    sub = _pieces_buffer((B * H, (NSEG - 1) * P["SPLITS"], DK, DV), a.device)
    buf = torch.empty(B * H, NSEG, DK, DV, dtype=torch.float32, device=a.device)
    _launch(_seg_local_kernel, (B * H, (NSEG - 1) * P["SPLITS"], P["NVP"]),
            (a, b, slope, sub, *a.stride(), *b.stride(), N, H, P["NC"], P["CPS"], NSEG, P["SPLITS"], P["CPSS"]),
            dict(DK=DK, DV=DV, BK=P["BKF"], BV=P["BVP"], C=C, REVERSE=reverse, DOT_PREC=prec,
                 PREFETCH=_prefetches()))
    U = min(8, triton.next_power_of_2(P["SPLITS"]))        # pieces a load of the scan (_fold_pieces)
    blk = min(1024, 4096 // U, triton.next_power_of_2(DK * DV))
    _seg_scan_kernel[(B * H, triton.cdiv(DK * DV, blk))](
        sub, edge if edge is not None else sub, buf, slope, H, N, NSEG, P["SPLITS"], P["CPS"], P["CPSS"], DK * DV,
        C=C, HAS_EDGE=edge is not None, REVERSE=reverse, BLOCK=blk, U=U)
    return (buf, *_segment_strides(P, DK, DV))


def _prefetches():
    """Whether the pre-pass and the walks ask L2 for their next chunk (their PREFETCH). Not in the CPU interpreter,
    which runs no inline PTX. A function, so that a test can turn it off and compare."""
    return not interpreting()


def _walk_prefetches(reverse, transposed_state):
    """_prefetches(), but never for the dv walk (reverse, carrying dS): at sm_90 it already holds 255 registers
    (24 bytes spilled), the prefetch's addresses spilled 56 more, and it ran no faster (benchmarks/RESULTS.md,
    sixteenth session)."""
    return _prefetches() and not (reverse and not transposed_state)


def gluon_walks_run_on(device) -> bool:
    """Whether the Gluon walks (gluon_walk.py) take the walks they apply to on this device: a Hopper GPU, with the
    Triton release they are written for, not turned off by TNLLM_GLUON_WALKS=0."""
    return _gluon_walk is not None and _gluon_walk.runs_on(torch.device(device))


def _both_tiles_fill(programs, sms) -> bool:
    """Whether the Gluon walks' programs holding both Z tiles (one an SM, ``programs`` = batch*heads*segments of
    them) fill the GPU's SMs, less 5%, so that they run where two programs an SM did. Measured on one H200
    (benchmarks/RESULTS.md, twenty-first session; bf16, H=16, 32768 tokens): 512, 256, 128 and 128 of them at
    N = 1024, 2048, 4096 and 32768, forward+backward replayed back to back 4.4-4.6% shorter. Where the plan takes
    one program an SM in one segment (N = 8192: 64 of them) they would leave half the SMs idle, so two programs a
    head walk there as before; where it would take two segments so (N = 16384), it takes four (see _plan)."""
    return 20 * programs >= 19 * sms


def _walk(x, y, z, out, slope, t0, tout, P, C, prec, reverse, transposed_state):
    """Launch one walk (see _walk_kernel): out from (x, y, z), starting states t0 = (buffer or None, strides),
    the final state into tout (or None). Z's features are tiled; X's and Y's are all held."""
    B, N, H, WX = x.shape
    if _gluon_walk is not None and _gluon_walk.applies(x, y, z, out, C):
        _gluon_walk.walk(x, y, z, out, slope, t0, tout, P["NC"], P["CPS"], P["NSEG"], reverse, transposed_state,
                         both_tiles=_both_tiles_fill(B * H * P["NSEG"], _num_sms(x.device)))
        return
    WZ = z.shape[-1]
    # the walks carrying S or dS hold all of Dk and tile Dv; those carrying a transpose hold all of Dv, tile Dk
    BX, BZ, NZ = (P["BVF"], P["BKT"], P["NK"]) if transposed_state else (P["BKF"], P["BVT"], P["NV"])
    t0_buf, t0_bh, t0_s = t0
    # the Z tiles of one (batch*head, segment) run side by side: the second reads X and Y from L2
    _launch(_walk_kernel, (B * H * NZ, P["NSEG"]),
            (x, y, z, out, slope, t0_buf if t0_buf is not None else out, tout if tout is not None else out,
             *x.stride(), *y.stride(), *z.stride(), *out.stride()[:3], t0_bh, t0_s, N, H, P["NC"], P["CPS"], P["NSEG"]),
            dict(WX=WX, WZ=WZ, DV=WX if transposed_state else WZ, BX=BX, BZ=BZ, C=C, REVERSE=reverse,
                 STATE_T=transposed_state, HAS_T0=t0_buf is not None, STORE_T=tout is not None, DOT_PREC=prec,
                 PREFETCH=_walk_prefetches(reverse, transposed_state)))


def _fwd(q, k, v, slope, s0, output_final_state, C, num_segments):
    B, N, H, DK = q.shape
    DV = v.shape[-1]
    one_an_sm = _gluon_walk is not None and _gluon_walk.takes_heads(q.device, q.dtype, DK, DV)
    P = _plan(B, N, H, DK, DV, C, _num_sms(q.device), num_segments, one_an_sm=one_an_sm)
    prec = _dot_prec(q.dtype)
    o = torch.empty(B, N, H, DV, dtype=v.dtype, device=q.device)
    sfin = torch.empty(B, H, DK, DV, dtype=torch.float32, device=q.device) if output_final_state else None
    states = _segment_states(k, v, slope, s0, P, C, prec, reverse=False)
    _walk(q, k, v, o, slope, states, sfin, P, C, prec, reverse=False, transposed_state=False)
    # the backward pass gets this count: it reads the segment states made here, whatever would be planned then
    return o, sfin, states[0], P["NSEG"]


def _bwd(q, k, v, slope, sinit, do, dht, need_dh0, C, num_segments):
    B, N, H, DK = q.shape
    DV = v.shape[-1]
    P = _plan(B, N, H, DK, DV, C, _num_sms(q.device), num_segments)
    prec = _dot_prec(q.dtype)
    dev = q.device
    dq = torch.empty(B, N, H, DK, dtype=q.dtype, device=dev)
    dk = torch.empty(B, N, H, DK, dtype=k.dtype, device=dev)
    dv = torch.empty(B, N, H, DV, dtype=v.dtype, device=dev)
    dh0 = torch.empty(B, H, DK, DV, dtype=torch.float32, device=dev) if need_dh0 else None
    # dq: a forward walk from the segment states the forward pass made
    states = (sinit, *_segment_strides(P, DK, DV)) if sinit is not None else (None, 0, 0)
    _walk(do, v, k, dq, slope, states, None, P, C, prec, reverse=False, transposed_state=True)
    # dk, dv: reverse walks from dS at each segment's end
    dstates = _segment_states(q, do, slope, dht, P, C, prec, reverse=True)
    if _gluon_walk is not None and _gluon_walk.pair_applies(q, k, v, do, C):
        # on Hopper, both in one launch: the q and dO tiles one walk reads the other finds in L2 (gluon_walk.py)
        _gluon_walk.walk_pair(q, k, v, do, dk, dv, slope, dstates, dh0, P["NC"], P["CPS"], P["NSEG"])
    else:
        _walk(v, do, q, dk, slope, dstates, None, P, C, prec, reverse=True, transposed_state=True)
        _walk(k, q, do, dv, slope, dstates, dh0, P, C, prec, reverse=True, transposed_state=False)
    return dq, dk, dv, dh0


class LightningAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, initial_state, output_final_state, chunk_size, num_segments):
        s0 = None
        if initial_state is not None:
            s0 = initial_state.detach().to(torch.float32).contiguous()
        slope32 = slope.detach().to(torch.float32).contiguous()
        o, sfin, sinit, segments = _fwd(q, k, v, slope32, s0, output_final_state, chunk_size, num_segments)
        ctx.save_for_backward(q, k, v, slope32, sinit)
        ctx.has_s0 = initial_state is not None
        ctx.s0_dtype = initial_state.dtype if initial_state is not None else None
        ctx.chunk_size = chunk_size
        ctx.num_segments = segments
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
    if num_segments is not None and (isinstance(num_segments, bool) or not isinstance(num_segments, int)
                                     or num_segments < 1):
        raise ValueError(f"lightning_attention_triton: num_segments must be None (fill the GPU) or an int >= 1, "
                         f"got {num_segments!r}")
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
