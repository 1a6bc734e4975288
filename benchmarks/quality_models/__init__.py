"""fairseq --user-dir of the quality benchmark (benchmarks/quality.py): TransNormerLLM from tnllm_plugin, and
beside it, registered here by the benchmark and not by the plugin, a LLaMA-style Transformer baseline:

    model ``llama_baseline``:  x = embed(tokens); per layer x += Attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x));
                               logits = lm_head(RMSNorm(x))   (untied, as TransNormerLLM's)
    Attn: rotary positions on q and k, F.scaled_dot_product_attention(is_causal=True)

fairseq takes one --user-dir per run, so both models (and the plugin's criterion) come through this one package:
the same `fairseq-train` command trains either, and only the --arch and model flags differ. Both use the plugin's
``--optimizer torch_adamw`` (fairseq's adam options on torch's fused AdamW).

Plain PyTorch; no Hugging Face. Initialisation as TransNormerLLM's: every linear and embedding weight N(0, 0.02),
the padding row zero, norm weights one."""
import importlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from fairseq.models import (FairseqDecoder, FairseqLanguageModel, register_model,  # noqa: E402
                            register_model_architecture)

import tnllm_plugin.fairseq_adapter  # noqa: E402,F401  (registers transnormer_llm, its criterion, torch_adamw)


def refuse_block_form_on_cuda():
    """Make lightning attention's PyTorch block form an error for CUDA tensors. The dispatcher sends CUDA inputs the
    Triton kernel takes to it and everything else to the block form, silently; this benchmark must time and train
    the Triton path, so a CUDA call reaching the block form (a head size or dtype the kernel refuses) stops the run."""
    # the module (the package's attribute of that name is the function it re-exports)
    dispatch = importlib.import_module("tnllm_kernels.lightning_attention")
    block_form = dispatch.lightning_attention_chunk

    def cpu_only_block_form(q, *args, **kwargs):
        if q.is_cuda:
            raise RuntimeError(f"quality benchmark: lightning attention on CUDA took the PyTorch block form (q "
                               f"{tuple(q.shape)} {q.dtype}), not the Triton kernel")
        return block_form(q, *args, **kwargs)
    dispatch.lightning_attention_chunk = cpu_only_block_form
    return block_form


# set by quality.py for the fairseq runs it starts: the processes in which the guard below goes up when this package
# is imported (fairseq imports it as the --user-dir)
REFUSE_BLOCK_FORM_ENV = "TNLLM_REFUSE_BLOCK_FORM_ON_CUDA"


def announce_kernels():
    """On a CUDA machine, in a benchmark's process (REFUSE_BLOCK_FORM_ENV=1), import the Triton kernels TransNormerLLM
    dispatches to, refuse the block form there, and say so in the training log (quality.py records it with each
    run). Only there: the guard holds for the whole process, and the tests import this package for its CPU pieces
    beside GPU tests that run the block form on CUDA on purpose (float64)."""
    if not torch.cuda.is_available() or os.environ.get(REFUSE_BLOCK_FORM_ENV) != "1":
        return
    from tnllm_kernels.lightning_attention.triton_chunk import lightning_attention_triton  # noqa: F401
    from tnllm_kernels.srmsnorm.triton_srmsnorm import srms_norm_triton  # noqa: F401
    refuse_block_form_on_cuda()
    print("quality_models: TransNormerLLM kernels: Triton (lightning attention, SRMSNorm)", flush=True)


announce_kernels()


# ---------------------------------------------------------------------------------------------------------
# The baseline in plain PyTorch

@dataclass
class LlamaConfig:
    vocab_size: int
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 2304
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    pad_id: int = 1

    def __post_init__(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into {self.n_heads} heads of an even size")


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 (also under bf16 autocast), cast back."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def rotary(x, theta):
    """Rotary positions on x [B, H, N, e]: pairs (x_i, x_{i+e/2}) rotated by angle pos * theta^(-2i/e), in fp32."""
    n, e = x.shape[-2], x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, e, 2, device=x.device, dtype=torch.float32) / e)
    angle = torch.arange(n, device=x.device, dtype=torch.float32)[:, None] * inv_freq    # [N, e/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.theta = cfg.n_heads, cfg.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotary(q, self.theta), rotary(k, self.theta)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)      # flash attention on CUDA in bf16
        return self.o_proj(o.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.ffn_norm, self.ffn = RMSNorm(cfg.d_model, cfg.norm_eps), SwiGLU(cfg)

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class LlamaLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and not m.weight.is_meta:
                nn.init.normal_(m.weight, 0.0, cfg.init_std)
        if not self.embed_tokens.weight.is_meta:
            with torch.no_grad():
                self.embed_tokens.weight[cfg.pad_id].zero_()

    def forward(self, tokens):
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.final_norm(x))


# ---------------------------------------------------------------------------------------------------------
# fairseq registration

def llama_config_from_args(args, dictionary) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(dictionary), d_model=args.decoder_embed_dim, n_layers=args.decoder_layers,
                       n_heads=args.decoder_attention_heads, ffn_dim=args.decoder_ffn_embed_dim,
                       rope_theta=args.rope_theta, init_std=args.init_std, pad_id=dictionary.pad())


class LlamaDecoder(FairseqDecoder):
    def __init__(self, llama: LlamaLM, dictionary, max_positions: int, bf16_autocast: bool):
        super().__init__(dictionary)
        self.llama, self.max_target_positions, self.bf16_autocast = llama, max_positions, bf16_autocast

    def forward(self, prev_output_tokens, **unused):
        # the same mixed precision as TransNormerDecoder: bf16 matmuls over fp32 weights on CUDA
        enabled = self.bf16_autocast and prev_output_tokens.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled):
            return self.llama(prev_output_tokens), {"attn": [None], "inner_states": None}

    def max_positions(self):
        return self.max_target_positions


@register_model("llama_baseline")
class LlamaLanguageModel(FairseqLanguageModel):
    @staticmethod
    def add_args(parser):
        parser.add_argument("--decoder-embed-dim", type=int)
        parser.add_argument("--decoder-layers", type=int)
        parser.add_argument("--decoder-attention-heads", type=int)
        parser.add_argument("--decoder-ffn-embed-dim", type=int, help="SwiGLU inner width")
        parser.add_argument("--rope-theta", type=float)
        parser.add_argument("--init-std", type=float)
        parser.add_argument("--bf16-autocast", action="store_true", help="as transnormer_llm's")

    @classmethod
    def build_model(cls, args, task):
        llama_base_architecture(args)
        llama = LlamaLM(llama_config_from_args(args, task.target_dictionary))
        return cls(LlamaDecoder(llama, task.target_dictionary, getattr(args, "tokens_per_sample", 2048),
                                getattr(args, "bf16_autocast", False)))


@register_model_architecture("llama_baseline", "llama_baseline")
def llama_base_architecture(args):
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", None) or 768
    args.decoder_layers = getattr(args, "decoder_layers", None) or 12
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", None) or 12
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", None) or 2304
    args.rope_theta = getattr(args, "rope_theta", None) or 10000.0
    args.init_std = getattr(args, "init_std", None) or 0.02


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters of a TransNormerLLM or LlamaLM; non_embedding leaves out the embedding and the LM head."""
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    return n


__all__ = ["LlamaConfig", "LlamaLM", "count_parameters"]
