"""TransNormerLLM in plain PyTorch (arXiv 2307.14995), readable top to bottom.

    x = embed(tokens) * sqrt(d_model)
    for each layer:  x = x + GLA(norm(x));  x = x + SGLU(norm(x))
    logits = lm_head(norm(x))

GLA is gated linear attention with a fixed per-head exponential decay (and LRPE-d on the layers that
use it); SGLU is a GLU without activation. Nothing here imports a training host: fairseq and Metaseq
adapters wrap this module (see fairseq_adapter.py, metaseq_adapter.py). Module and parameter names follow
the released checkpoints (``layers.{i}.token_mixer.qkvu_proj`` ...), so converting them is a renaming.
The defaults reproduce the released checkpoints; the paper's ablation choices are options.
"""
import functools
import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module      # the global forward hooks (_has_hooks)

from tnllm_kernels import (gla_decode_step, gla_decode_step_applies, lightning_attention, lightning_attention_step,
                           linear_cross_entropy, srms_norm, srms_norm_gate)
from tnllm_kernels.srmsnorm import srms_norm_vjp
from tnllm_kernels.decode_linear import decode_embedding, decode_embedding_applies, decode_linear, decode_linear_applies
from tnllm_kernels.fused_cross_entropy import DEFAULT_CHUNK

from .recompute import Product, linears_after

DECAY_SCHEDULES = ("released", "paper", "no-temperature")
QK_ACTIVATIONS = ("silu", "1+elu", "none")
NORMS = ("srms", "rms", "layer")


@dataclass
class TransNormerConfig:
    vocab_size: int = 64000
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 8
    hidden_dim: Optional[int] = None       # GLA width; None means d_model (as in the released models)
    glu_dim: int = 2816
    lrpe_layers: Sequence[int] = (0,)      # layers that use LRPE-d; the paper's "Mix": first layer only
    decay: str = "released"                # "released" (ALiBi slopes, layer factor), "paper" (eq. 2), or
                                           # "no-temperature" (ALiBi slopes in every layer: Table 4's ablation)
    qk_act: str = "silu"
    norm: str = "srms"
    bias: bool = False
    no_scale_embedding: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    norm_eps: float = 1e-6
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    block_size: int = 64                   # block length of the CPU block-form attention

    def __post_init__(self):
        if self.hidden_dim is None:
            self.hidden_dim = self.d_model
        self.lrpe_layers = tuple(int(i) for i in self.lrpe_layers)
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "hidden_dim", "glu_dim", "block_size")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.hidden_dim % self.n_heads:
            raise ValueError(f"hidden_dim={self.hidden_dim} is not divisible by n_heads={self.n_heads}")
        if self.decay not in DECAY_SCHEDULES:
            raise ValueError(f"unknown decay schedule {self.decay!r}; expected one of {DECAY_SCHEDULES}")
        if self.qk_act not in QK_ACTIVATIONS:
            raise ValueError(f"unknown q/k activation {self.qk_act!r}; expected one of {QK_ACTIVATIONS}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {NORMS}")
        bad = [i for i in self.lrpe_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"lrpe_layers {bad} out of range for n_layers={self.n_layers}")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} is outside the vocabulary of {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads


# ---------------------------------------------------------------------------------------------------------
# Decay schedules: lambda = exp(-slope), one slope per (layer, head); fixed buffers, never learned.

def alibi_slopes(n_heads: int) -> List[float]:
    """ALiBi's head slopes 2^(-8(h+1)/H); for H not a power of two, ALiBi's interleaving rule."""
    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]
    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def decay_slopes(cfg: TransNormerConfig) -> torch.Tensor:
    """[n_layers, n_heads] float64 slopes of the chosen schedule (see the spec). "no-temperature" is the
    released schedule without its layer temperature (the factor that makes the last layer's decay ~1): the paper's
    Table 4 ablation, applied to the schedule the plugin trains with."""
    L, H = cfg.n_layers, cfg.n_heads
    layer = torch.arange(L, dtype=torch.float64)[:, None]
    if cfg.decay in ("released", "no-temperature"):
        base = torch.tensor(alibi_slopes(H), dtype=torch.float64)[None, :]
        if cfg.decay == "no-temperature":
            return base.expand(L, H).clone()
        factor = 1 - layer / (L - 1) + 1e-5 if L > 1 else torch.ones_like(layer)
        return base * factor
    head = torch.arange(H, dtype=torch.float64)[None, :]
    return (8 * head / H) * (1 - layer / L)


# ---------------------------------------------------------------------------------------------------------
# Norms

class SRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), in fp32, no parameters (the released form of the paper's eq. 8)."""

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return srms_norm(x, self.eps)

    def vjp(self, x):
        """(forward(x), its backward without autograd) where the Triton kernel runs, else None (recompute.py)."""
        return srms_norm_vjp(x, None, self.eps)


class SRMSNormGate:
    """srms_norm(o) * u (GLA's output norm and gate) as a recompute prefix, with the kernel's vjp."""

    def __init__(self, eps: float):
        self.eps = eps

    def __call__(self, o, u):
        return srms_norm_gate(o, u, self.eps)

    def vjp(self, o, u):
        return srms_norm_vjp(o, u, self.eps)


def make_norm(cfg: TransNormerConfig, dim: int) -> nn.Module:
    if cfg.norm == "srms":
        return SRMSNorm(cfg.norm_eps)
    if cfg.norm == "rms":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


def norm_then_linears(norm: Optional[nn.Module], x, linears, recompute: bool):
    """[linear(norm(x)) for linear in linears]. With ``recompute``, the parameter-free SRMSNorm is recomputed in
    backward instead of its output (and autocast's bf16 copy of it) being kept: x is kept anyway, as the norm's own
    backward needs it (recompute.linears_after). Without a norm, the linears of x."""
    if norm is None:
        return [m(x) for m in linears]
    if type(norm) is SRMSNorm:
        return linears_after(norm, [x], linears, recompute)
    y = norm(x)
    return [m(y) for m in linears]


# ---------------------------------------------------------------------------------------------------------
# Token mixer

class LRPE(nn.Module):
    """LRPE-d: x -> [x cos(theta p), x sin(theta p)], so q_s . k_t depends on s - t only. Doubles the head dim."""

    def __init__(self, n_heads: int, head_dim: int):
        super().__init__()
        self.theta = nn.Parameter(self.frequencies(n_heads, head_dim))

    @staticmethod
    def frequencies(n_heads: int, head_dim: int) -> torch.Tensor:
        """theta's initial value [H, 1, e]: 10000^(-2i/d) over the whole width d = H * e."""
        d = n_heads * head_dim
        return (10000 ** (-2 / d * torch.arange(d, device="cpu"))).reshape(n_heads, 1, head_dim)

    def forward(self, x, offset=0):
        # x [B, N, H, e]; positions are absolute (offset = tokens already consumed); angles in at least fp32
        # (the released code forms them in the input dtype, which loses positions past 256 in bf16).
        # offset may also be a tensor [B] of per-row start positions (left-padded batches, CUDA graphs): the
        # angles of a row are then the same numbers as when that row runs alone at that offset.
        acc = torch.promote_types(x.dtype, torch.float32)
        theta = self.theta.to(acc).squeeze(1)                                       # [H, e]
        if torch.is_tensor(offset):
            pos = offset.to(acc)[:, None] + torch.arange(x.shape[1], device=x.device, dtype=acc)   # [B, N]
            angle = pos[:, :, None, None] * theta                                   # [B, N, H, e]
        else:
            pos = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=acc)
            angle = pos[:, None, None] * theta[None]                                # [N, H, e]
        xf = x.to(acc)
        return torch.cat([xf * torch.cos(angle), xf * torch.sin(angle)], dim=-1).to(x.dtype)


def qk_activation(name: str):
    if name == "silu":
        return F.silu
    if name == "1+elu":
        return lambda x: 1 + F.elu(x)
    return lambda x: x


class GatedLinearAttention(nn.Module):
    """O = norm(causal decayed linear attention(phi(Q), phi(K), V)) * U, then W_o."""
    RECOMPUTES = ("token_norm", "out_gate")     # the linear inputs it may recompute (recompute.RECOMPUTABLE)

    def __init__(self, cfg: TransNormerConfig, layer_idx: int, slope: torch.Tensor):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkvu_proj = nn.Linear(cfg.d_model, 4 * cfg.hidden_dim, bias=cfg.bias)
        self.out_proj = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=cfg.bias)
        self.lrpe = LRPE(cfg.n_heads, cfg.head_dim) if layer_idx in cfg.lrpe_layers else None
        self.out_norm = make_norm(cfg, cfg.hidden_dim)      # over the whole hidden dim, not per head
        self.act = qk_activation(cfg.qk_act)
        self.qk_act = cfg.qk_act
        self.block_size = cfg.block_size
        self.register_buffer("slope", slope.float(), persistent=False)   # [H]
        # recompute.keep_linear_inputs keeps some or all instead: faster, more memory
        self.recompute_linear_inputs = frozenset(self.RECOMPUTES)

    def _apply(self, fn, recurse=True):
        # the decay rates are constants of the architecture: a cast of the module (fairseq's --bf16 does
        # model.to(bfloat16)) moves them to the new device but keeps them fp32, as bf16 would shift lambda^n
        slope = self.slope
        super()._apply(fn, recurse)
        self.slope = slope.to(self.slope.device)
        return self

    def forward(self, x, state=None, offset=0, padding_mask=None, norm: Optional[nn.Module] = None,
                state_in_place: bool = False):
        """x [B, N, d_model]: normalised, or the block's input with ``norm`` (the block's token norm) to apply.
        ``state_in_place``: a one-token step may write the new state into ``state`` (decode_step_ owns it)."""
        qkvu, = norm_then_linears(norm, x, [self.qkvu_proj], "token_norm" in self.recompute_linear_inputs)
        return self.mix(qkvu, state, offset, padding_mask, state_in_place)

    def mix(self, qkvu, state=None, offset=0, padding_mask=None, state_in_place: bool = False):
        """From the QKVU projection [B, N, 4 * hidden] on: (W_o's output [B, N, d_model], the new state)."""
        b, n, _ = qkvu.shape
        if n == 1 and state is not None and padding_mask is None and self._fused_step_applies(qkvu, state, offset):
            return self._fused_step(qkvu, state, offset, state_in_place)
        q, k, v, u = qkvu.chunk(4, dim=-1)
        # heads from the tensor width, so that a tensor-parallel shard holding H/tp heads runs unchanged
        q, k, v = (t.reshape(b, n, -1, self.head_dim) for t in (q, k, v))
        q, k = self.act(q), self.act(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, offset), self.lrpe(k, offset)
        if padding_mask is not None:       # a zero v adds nothing to the state: padding leaves it untouched
            v = v.masked_fill(padding_mask[:, :, None, None], 0)
        if n == 1 and state is not None:    # decoding: one recurrence step
            o, state = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], self.slope, state)
            o = o[:, None]
        else:
            o, state = lightning_attention(q, k, v, self.slope, state, self.block_size)
        o = o.reshape(b, n, -1)
        if type(self.out_norm) is SRMSNorm:
            # norm and gate in one kernel on CUDA (same values as below), recomputed in backward: W_o's input is
            # not kept (o is, and u is part of the QKVU output that the activation keeps)
            out, = linears_after(SRMSNormGate(self.out_norm.eps), [o, u], [self.out_proj],
                                 "out_gate" in self.recompute_linear_inputs)
            return out, state
        return self.out_proj(self.out_norm(o) * u), state

    def _fused_step_applies(self, qkvu, state, offset) -> bool:
        # decoding only (no autograd through the kernels); on CPU, float64, or a head dim the kernels do not take,
        # the composition below runs. A tensor-parallel shard takes it too: its kernels see only its own heads,
        # slopes and theta, and ParallelOutNorm (the norm over the whole hidden dim) stays in PyTorch.
        if torch.is_grad_enabled() and (qkvu.requires_grad or state.requires_grad):
            return False
        theta = None if self.lrpe is None else self.lrpe.theta
        return gla_decode_step_applies(qkvu[:, 0], state, offset, theta)

    def _fused_step(self, qkvu, state, offset, in_place):
        """The one-token step in two Triton kernels (tnllm_kernels.gla_decode) instead of ~15 small ones: under
        a CUDA graph a decode step at batch 1 costs mostly launches, and the state is read and written once."""
        b = qkvu.shape[0]
        srms = type(self.out_norm) is SRMSNorm
        y, state = self.state_step(qkvu[:, 0], state, offset, in_place, self.out_norm.eps if srms else None)
        y = y.view(b, 1, -1)
        if not srms:
            y = self.out_norm(y) * qkvu.chunk(4, dim=-1)[3]
        return self.out_proj(y), state

    def state_step(self, qkvu, state, offset, in_place, norm_eps=None, with_sumsq=False):
        """The fused step's state update from qkvu [B, 4 * hidden]: (o [B, hidden], or srms_norm(o) * u with
        ``norm_eps``; the new state[; o's rows' sums of squares in parts, with ``with_sumsq``])."""
        theta = None if self.lrpe is None else self.lrpe.theta
        return gla_decode_step(qkvu, state, self.slope, offset, theta, self.qk_act, norm_eps, in_place=in_place,
                               with_sumsq=with_sumsq)


# ---------------------------------------------------------------------------------------------------------
# Channel mixer and block

class SGLU(nn.Module):
    """((X W1) * (X W2)) W3: a GLU without activation."""
    RECOMPUTES = ("channel_norm", "sglu_product")

    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        self.l1 = nn.Linear(cfg.d_model, cfg.glu_dim, bias=cfg.bias)
        self.l2 = nn.Linear(cfg.d_model, cfg.glu_dim, bias=cfg.bias)
        self.l3 = nn.Linear(cfg.glu_dim, cfg.d_model, bias=cfg.bias)
        self.recompute_linear_inputs = frozenset(self.RECOMPUTES)    # see GatedLinearAttention

    def forward(self, x, norm: Optional[nn.Module] = None):
        """x [B, N, d_model]: normalised, or the block's input with ``norm`` (the block's channel norm) to apply.
        The product is recomputed in backward (its factors are kept, as its own backward needs them), so W3's
        input is not kept."""
        a, b = norm_then_linears(norm, x, [self.l1, self.l2], "channel_norm" in self.recompute_linear_inputs)
        return linears_after(Product(), [a, b], [self.l3], "sglu_product" in self.recompute_linear_inputs)[0]


class TransNormerBlock(nn.Module):
    def __init__(self, cfg: TransNormerConfig, layer_idx: int, slope: torch.Tensor):
        super().__init__()
        self.token_norm = make_norm(cfg, cfg.d_model)
        self.token_mixer = GatedLinearAttention(cfg, layer_idx, slope)
        self.channel_norm = make_norm(cfg, cfg.d_model)
        self.channel_mixer = SGLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, state=None, offset=0, padding_mask=None, state_in_place: bool = False):
        if self._fused_decode_applies(x, state, padding_mask):
            return self._fused_decode(x, state, offset, state_in_place)[:2]
        # each norm runs inside its mixer, as the first step of the mixer's input projections (recomputed there
        # in backward rather than kept)
        mixed, state = self.token_mixer(x, state, offset, padding_mask, norm=self.token_norm,
                                        state_in_place=state_in_place)
        x = x + self.dropout(mixed)
        x = x + self.dropout(self.channel_mixer(x, norm=self.channel_norm))
        return x, state

    def _fused_decode_applies(self, x, state, padding_mask=None) -> bool:
        # decoding only, on the layer the released models have (SRMSNorm everywhere, plain linear layers without
        # bias: a tensor-parallel shard's layers communicate and keep the composition), where the kernel runs (CUDA,
        # at most decode_linear.MAX_ROWS rows: larger batches keep cuBLAS, see there)
        if state is None or x.shape[1] != 1 or padding_mask is not None:      # one unpadded token with a state
            return False
        mixer, glu = self.token_mixer, self.channel_mixer
        if torch.is_grad_enabled() and (x.requires_grad or state.requires_grad):
            return False
        if self.training and self.dropout.p > 0:
            return False
        linears = (mixer.qkvu_proj, mixer.out_proj, glu.l1, glu.l2, glu.l3)
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return False
        if any(type(n) is not SRMSNorm for n in (self.token_norm, mixer.out_norm, self.channel_norm)):
            return False
        return decode_linear_applies(x[:, 0], mixer.qkvu_proj.weight, self.token_norm.eps)

    def _fused_decode(self, x, state, offset, state_in_place, x_sumsq=None):
        """The block for one token in five kernels (tnllm_kernels.decode_linear, gla_decode) instead of 13:
        each linear layer is one GEMV with the norm, gate, SGLU product or residual add beside it folded in. Under
        a CUDA graph a decode step at small batch costs launches and gaps between kernels more than bandwidth.
        Returns (output [B, 1, d], new state, the output's rows' sums of squares in parts).
        Each norm's sums of squares come in parts from the kernel that wrote its input (``x_sumsq`` from the block
        before, see TransNormerLLM._blocks; with_sumsq / x_sumsq inside): a GEMV then need not read its rows twice."""
        mixer, glu = self.token_mixer, self.channel_mixer
        h = x[:, 0]
        qkvu = decode_linear(h, mixer.qkvu_proj.weight, norm_eps=self.token_norm.eps, x_sumsq=x_sumsq)
        h_sumsq = None
        if mixer._fused_step_applies(qkvu[:, None], state, offset):
            o, state, o_sumsq = mixer.state_step(qkvu, state, offset, state_in_place, with_sumsq=True)
            hidden = o.shape[-1]
            h, h_sumsq = decode_linear(o, mixer.out_proj.weight, norm_eps=mixer.out_norm.eps,
                                       gate=qkvu[:, 3 * hidden:], residual=h, x_sumsq=o_sumsq, with_sumsq=True)
        else:       # the step's kernels do not take these inputs: its composition, from the same QKVU
            mixed, state = mixer.mix(qkvu[:, None], state, offset, None, state_in_place)
            h = h + mixed[:, 0]
        product = decode_linear(h, glu.l1.weight, norm_eps=self.channel_norm.eps, weight2=glu.l2.weight,
                                x_sumsq=h_sumsq)
        h, h_sumsq = decode_linear(product, glu.l3.weight, residual=h, with_sumsq=True)
        return h[:, None], state, h_sumsq


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling the module runs hooks (its own or global ones) that calling one of its methods would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or _torch_module._global_forward_hooks
                or _torch_module._global_forward_pre_hooks)


# ---------------------------------------------------------------------------------------------------------
# Decoding state and the model

@dataclass
class DecodeState:
    """What generation carries between calls: each layer's fp32 attention state [B, H, Dk, Dv] and the
    number of positions consumed so far (LRPE needs the absolute position of the next token).
    ``positions`` (optional, int64 [B]) is each row's own next position; when set it replaces ``offset`` for
    LRPE (left-padded batches whose rows have different lengths; a device tensor a CUDA graph can advance)."""
    kv: List[torch.Tensor] = field(default_factory=list)
    offset: int = 0
    positions: Optional[torch.Tensor] = None

    def index_select(self, order: torch.Tensor) -> "DecodeState":
        """Reorder or select batch rows (beam search, finished sequences)."""
        positions = None if self.positions is None else self.positions.index_select(0, order)
        return replace(self, kv=[s.index_select(0, order) for s in self.kv], positions=positions)


INIT_TILE = 256


def tiled_normal(shape, index, std: float, key: str) -> torch.Tensor:
    """Block ``index`` (two slices with concrete bounds) of a [rows, cols] matrix of N(0, std) values drawn in
    INIT_TILE x INIT_TILE tiles, tile (i, j) from a generator seeded by a hash of ``key`` and (i, j): any block
    is the same whether it is made alone or cut from the whole matrix."""
    (r0, r1), (c0, c1) = ((sl.start, sl.stop) for sl in index)
    out = torch.empty(r1 - r0, c1 - c0, device="cpu")
    t = INIT_TILE
    for i in range(r0 // t, -(-r1 // t)):
        for j in range(c0 // t, -(-c1 // t)):
            digest = hashlib.blake2b(f"{key}/{i}/{j}".encode(), digest_size=8).digest()
            g = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)
            tr, tc = min(t, shape[0] - i * t), min(t, shape[1] - j * t)
            tile = torch.empty(tr, tc, device="cpu").normal_(0.0, std, generator=g)
            rows = slice(max(r0, i * t), min(r1, i * t + tr))
            cols = slice(max(c0, j * t), min(c1, j * t + tc))
            out[rows.start - r0:rows.stop - r0, cols.start - c0:cols.stop - c0] = \
                tile[rows.start - i * t:rows.stop - i * t, cols.start - j * t:cols.stop - j * t]
    return out


class TransNormerLLM(nn.Module):
    def __init__(self, cfg: TransNormerConfig):
        super().__init__()
        self.cfg = cfg
        # one draw from the global RNG, before the layers' constructors draw (they do not on the meta device),
        # seeds the initial values: torch.manual_seed still decides the weights, and any block of a parameter can
        # be made alone (see initializers)
        self.init_seed = int(torch.randint(1 << 62, (), device="cpu"))
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(cfg.d_model)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        slopes = decay_slopes(cfg)
        self.layers = nn.ModuleList(TransNormerBlock(cfg, i, slopes[i]) for i in range(cfg.n_layers))
        self.final_norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)   # untied, as released
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        """Every parameter to its initial value (parameters on the meta device are left as they are)."""
        with torch.no_grad():
            for name, make in self.initializers().items():
                p = self.get_parameter(name)
                if not p.is_meta:
                    p.copy_(make())

    def initializers(self) -> Dict[str, Callable[..., torch.Tensor]]:
        """For each parameter, a function that makes its initial value (fp32, on the CPU): the whole tensor, or
        with ``index`` (one slice per dimension) that block alone. Random matrices are drawn in tiles of
        ``INIT_TILE`` x ``INIT_TILE``, each from a generator of its own (seeded by ``init_seed``, the parameter's
        name and the tile's place), so a tensor-parallel rank makes only its slices, without ever holding the
        whole model and without drawing the other ranks' values."""
        inits = {}
        for mod_name, module in self.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                inits[name] = functools.partial(self._initial_value, module, p_name, name, tuple(p.shape))
        return inits

    def _initial_value(self, module: nn.Module, p_name: str, name: str, shape, index=None) -> torch.Tensor:
        # one slice per dimension with concrete bounds (no index: the whole tensor)
        index = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index or (slice(None),) * len(shape), shape))
        block = tuple(sl.stop - sl.start for sl in index)
        if isinstance(module, (nn.Linear, nn.Embedding)) and p_name == "weight":   # N(0, init_std)
            w = tiled_normal(shape, index, self.cfg.init_std, f"{self.init_seed}/{name}")
            pad = getattr(module, "padding_idx", None)
            if pad is not None and index[0].start <= pad < index[0].stop:
                w[pad - index[0].start] = 0
            return w
        if p_name == "bias":
            return torch.zeros(block, device="cpu")
        if isinstance(module, (nn.RMSNorm, nn.LayerNorm)) and p_name == "weight":
            return torch.ones(block, device="cpu")
        if isinstance(module, LRPE):
            return LRPE.frequencies(self.cfg.n_heads, self.cfg.head_dim)[index].clone()
        raise TypeError(f"no initial value for parameter {name} of {type(module).__name__}")

    def check_tokens(self, tokens: torch.Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError(f"empty input: tokens of shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be int64 or int32, got {tokens.dtype}")
        if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
            # a host sync cannot run while a CUDA graph is captured: a captured training step checks its inputs
            # eagerly before each replay instead (tnllm_plugin.cuda_graph_step, its ``check``)
            return
        lo, hi = torch.stack(torch.aminmax(tokens)).tolist()   # one host sync for both bounds, every forward
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = hi if hi >= self.cfg.vocab_size else lo
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def forward(self, tokens, state: Optional[DecodeState] = None, padding_mask=None, use_cache: bool = False,
                return_hidden: bool = False, positions: Optional[torch.Tensor] = None):
        """tokens [B, N] -> (logits [B, N, vocab], state). The returned state is None unless ``use_cache`` or
        a ``state`` was given; feeding it back continues the sequence (prefill, then one token per call).
        ``padding_mask`` [B, N] is True at padding (left padding keeps every sequence's state exact).
        ``positions`` [B] (optional): each row's position of tokens[:, 0], for LRPE; default: the state's
        per-row positions if it has them, else its offset. With ``return_hidden`` the final-norm hidden states
        come back in place of logits."""
        self.check_tokens(tokens)
        if state is not None and len(state.kv) not in (0, len(self.layers)):
            raise ValueError(f"decode state has {len(state.kv)} layers, the model {len(self.layers)}")
        offset = 0 if state is None else state.offset
        if positions is None and state is not None:
            positions = state.positions
        if positions is not None and tuple(positions.shape) != (tokens.shape[0],):
            raise ValueError(f"positions must be [batch]={tokens.shape[0]}, got shape {tuple(positions.shape)}")
        kv = state.kv if state is not None else None
        x, new_kv = self._blocks(tokens, kv, offset if positions is None else positions, padding_mask)
        out = x if return_hidden else self.lm_head(x)
        if state is None and not use_cache:
            return out, None
        n = tokens.shape[1]
        return out, DecodeState(kv=new_kv, offset=offset + n, positions=None if positions is None else positions + n)

    def _blocks(self, tokens, kv, positions, padding_mask, state_in_place: bool = False):
        """Embedding, the blocks and the final norm. positions: an int offset or per-row start positions [B].
        ``state_in_place``: the layers may write their new states into ``kv``'s tensors (only decode_step_)."""
        x = self.dropout(self._embed(tokens))
        new_kv = []
        x_sumsq = None      # a fused block's output rows' sums of squares in parts, for the next one's first norm
        for i, layer in enumerate(self.layers):
            state = kv[i] if kv else None
            if (type(layer) is TransNormerBlock and not _has_hooks(layer)
                    and layer._fused_decode_applies(x, state, padding_mask)):
                # the block's forward would take this path too; called here to hand the sums on (no hook skipped)
                x, layer_state, x_sumsq = layer._fused_decode(x, state, positions, state_in_place, x_sumsq)
            else:
                x, layer_state = layer(x, state, positions, padding_mask, state_in_place=state_in_place)
                x_sumsq = None
            new_kv.append(layer_state)
        return self.final_norm(x), new_kv

    def _embed(self, tokens):
        """embed_tokens(tokens) * embed_scale; for one decoding token a row one kernel (decode_embedding) instead
        of torch's gather and a multiply, where nothing hooks or replaces the embedding (finite.py's hooks, a
        vocab-parallel shard) and no gradient is wanted (nn.Embedding's backward skips the padding row)."""
        e = self.embed_tokens
        if (type(e) is nn.Embedding and e.max_norm is None and not _has_hooks(e)
                and not (torch.is_grad_enabled() and e.weight.requires_grad)
                and decode_embedding_applies(e.weight, tokens)):        # tokens [B, 1], B <= MAX_ROWS, on CUDA
            return decode_embedding(e.weight, tokens, self.embed_scale)
        return e(tokens) * self.embed_scale

    def decode_step_(self, tokens, state: DecodeState):
        """One recurrence step for tokens [B, 1] that updates ``state`` in place (its kv tensors and its per-row
        ``positions``) and returns the logits [B, 1, vocab]. Reads nothing back to the host and keeps the state's
        tensors (the new values are copied into them), so it can be captured in a CUDA graph and replayed; no input
        checks (forward does those). ``state.offset`` is left as it is: a replayed graph could not advance an int."""
        if state.positions is None or len(state.kv) != len(self.layers):
            raise ValueError("decode_step_ needs a full decode state with per-row positions")
        x, new_kv = self._blocks(tokens, state.kv, state.positions, None, state_in_place=True)
        for static, new in zip(state.kv, new_kv):
            if new is not static:       # the fused CUDA step updated it in place already
                static.copy_(new)
        state.positions.add_(1)
        return self.lm_head(x)

    def chunked_lm_loss(self, hidden, target, ignore_index: int = -100, reduction: str = "sum",
                        chunk_size: int = DEFAULT_CHUNK):
        """Cross entropy of the LM head's logits over ``hidden`` (``forward(..., return_hidden=True)``) against
        ``target`` [B, N], without the [tokens, vocab] logits: the head and the loss run ``chunk_size`` tokens at
        a time and the backward keeps only the gradients w.r.t. hidden and the head
        (tnllm_kernels.fused_cross_entropy; under autocast the head's matmul is in its dtype, the softmax in fp32).
        The value of ``F.cross_entropy(self.lm_head(hidden).float(), target, ignore_index=..., reduction=...)`` up
        to rounding; "none" gives target's shape. A vocab-parallel head holds a shard of the vocabulary: use
        tnllm_plugin.parallel.vocab_parallel_cross_entropy on its logits."""
        if getattr(self, "vocab_parallel", False):
            raise ValueError("chunked_lm_loss needs the whole vocabulary; this LM head is a vocab-parallel shard")
        return linear_cross_entropy(hidden, self.lm_head.weight, target, ignore_index, reduction, chunk_size)

    def num_parameters(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel() + self.lm_head.weight.numel()
        return n
