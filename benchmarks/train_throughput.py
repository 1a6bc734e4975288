"""Training throughput on one GPU: TransNormerLLM-385M next to a LLaMA of the same size (HF, SDPA attention)
and flash-linear-attention's RetNet and GLA, in one run, with the same training step for all:

    bf16 autocast, fp32 master weights, forward, cross entropy in fp32, backward, fused AdamW step

(the rows ending in ``_bf16`` hold the weights in bf16 and fp32 master copies in the optimizer instead, as
Metaseq's --bf16 does: MasterWeightsAdamW)

16384 tokens per step (batch = 16384 // seq_len, at least 1), sequence lengths 2048, 8192, 32768;
tokens/s is the median over the timed steps after warm-up; peak memory is torch.cuda.max_memory_allocated
over the whole measurement (GB = 1e9 bytes). TransNormerLLM runs several times, so that the table shows what each
change of the step is worth: as it was (``_no_recompute``: every linear layer keeps its input), with the norms,
GLA gate and SGLU product recomputed in backward (the model as it is, plain loss), and with the chunked LM head +
loss on top (``_fused_loss``, ``TransNormerLLM.chunked_lm_loss``: the [tokens, vocab] logits never exist); then
that step with bf16 weights (``_bf16``), with bf16 weights keeping every linear layer's input
(``_bf16_keep_inputs``) and keeping all but SGLU's product (``_bf16_recompute_product``); the same weights and
data, so the same loss up to rounding. Last the bf16 step and the one keeping all but SGLU's product with the whole
of it (train_step: forward, loss, backward, optimizer step, zero_grad) captured once in a CUDA graph and replayed
(``_bf16_graph``, ``_bf16_recompute_product_graph``,
tnllm_plugin.cuda_graph_step: the 385M step is bound by the host's time; the optimizer capturable, each batch checked
eagerly before its replay): the same kernels on the same data, so the same losses, expected bit for bit. Its peak
memory also shows the memory reserved after its timed steps (the graph's private pool, which the allocated counters
may not show); on the CPU (--smoke) it is skipped. Then the longest sequence our model trains at batch 1 with
per-block activation checkpointing and the chunked LM head + loss (doubling search; an OOM ends it).

    python benchmarks/train_throughput.py            # on the GPU; writes $OUT/train_throughput.{md,json}
    python benchmarks/train_throughput.py --smoke    # tiny sizes on CPU: checks the script runs
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmark_common import (free_memory as release, llama_model, profiled_kernels, reset_peak, sync,  # noqa: E402
                              transnormer_model)
from tnllm_kernels.fused_cross_entropy import check_target_ids  # noqa: E402
from tnllm_plugin.cuda_graph_step import CUDAGraphStep  # noqa: E402
from tnllm_plugin.parallel import apply_activation_checkpointing  # noqa: E402
from tnllm_plugin.recompute import keep_linear_inputs  # noqa: E402

FULL = dict(vocab=64000, layers=24, dim=1024, heads=8, ffn=2816, tokens=16384, seqs=(2048, 8192, 32768),
            warmup=3, steps=10, longest_start=32768, longest_max=1 << 22, loss_chunk=4096, smoke=False)
SMOKE = dict(vocab=256, layers=2, dim=64, heads=4, ffn=128, tokens=256, seqs=(32, 64, 128),
             warmup=1, steps=2, longest_start=128, longest_max=512, loss_chunk=48, smoke=True)


# ---------------------------------------------------------------------------------------------------------
# The models; each builder returns (model, loss_fn(model, x, y)) or raises with the reason it is skipped

def transnormer(s):
    return transnormer_model(s, full=not s["smoke"]), plain_loss(lambda m, x: m(x)[0])


def transnormer_no_recompute(s):
    """The step before issue 14's memory work: every linear layer keeps its input for backward (no recomputed
    norms, gate or SGLU product) and the plain loss."""
    return keep_linear_inputs(transnormer_model(s, full=not s["smoke"])), plain_loss(lambda m, x: m(x)[0])


def transnormer_fused_loss(s):
    def loss_fn(model, x, y):
        hidden, _ = model(x, return_hidden=True)
        return model.chunked_lm_loss(hidden, y, reduction="mean", chunk_size=s["loss_chunk"])
    return transnormer_model(s, full=not s["smoke"]), loss_fn


def transnormer_bf16(s):
    """The chunked loss, with the model's weights in bf16 and fp32 master copies in the optimizer
    (MasterWeightsAdamW, as Metaseq's --bf16): no autocast casts, bf16 activations and residual stream."""
    model, loss_fn = transnormer_fused_loss(s)
    return model.to(torch.bfloat16), loss_fn


def transnormer_bf16_keep_inputs(s):
    """transnormer_bf16 with every linear layer keeping its input (no recomputation in backward)."""
    model, loss_fn = transnormer_bf16(s)
    return keep_linear_inputs(model), loss_fn


def transnormer_bf16_recompute_product(s):
    """transnormer_bf16 keeping every linear layer's input but W3's (SGLU's product, the widest, recomputed): one
    recomputing layer per block instead of four."""
    model, loss_fn = transnormer_bf16(s)
    return keep_linear_inputs(model, ["token_norm", "out_gate", "channel_norm"]), loss_fn


def llama_sdpa(s):
    return llama_model(s, max(s["seqs"])), plain_loss(lambda m, x: m(input_ids=x, use_cache=False).logits)


def llama_sdpa_bf16(s):
    """LLaMA in the same bf16-weights regime as transnormer_bf16 (fp32 master copies, fp32 loss)."""
    model, loss_fn = llama_sdpa(s)
    return model.to(torch.bfloat16), loss_fn


def fla_model(kind, s):
    """fla's RetNet or GLA at our sizes (fla's defaults otherwise: RetNet 446M with expand_v=2; GLA with
    expand_k=0.5, the FFN at our width)."""
    if not torch.cuda.is_available():
        raise ImportError("fla's Triton kernels need CUDA")
    from fla import models
    sizes = dict(vocab_size=s["vocab"], hidden_size=s["dim"], num_hidden_layers=s["layers"], num_heads=s["heads"],
                 tie_word_embeddings=False)
    if kind == "retnet":
        return models.RetNetForCausalLM(models.RetNetConfig(**sizes))
    return models.GLAForCausalLM(models.GLAConfig(intermediate_size=s["ffn"], **sizes))


def fla_retnet(s):
    return fla_model("retnet", s), plain_loss(lambda m, x: m(input_ids=x, use_cache=False).logits)


def fla_gla(s):
    """fla's Gated Linear Attention model (the issue's "fla GLA if it runs"), plain fp32 loss as every row."""
    return fla_model("gla", s), plain_loss(lambda m, x: m(input_ids=x, use_cache=False).logits)


def fla_retnet_fused_loss(s):
    """RetNet with fla's own fused cross entropy (logits stay bf16, gradient written in place): RetNet's best
    case, a cheaper loss than the fp32 one every other row pays."""
    def loss_fn(m, x, y):
        # fla shifts `labels` itself (label of position i is labels[i + 1], the last position is ignored)
        labels = torch.cat([y[:, :1], y[:, :-1]], dim=1)
        return m(input_ids=x, labels=labels, use_cache=False).loss
    return fla_model("retnet", s), loss_fn


MODELS = {"transnormer_llm_385m": transnormer, "transnormer_llm_385m_no_recompute": transnormer_no_recompute,
          "transnormer_llm_385m_fused_loss": transnormer_fused_loss, "transnormer_llm_385m_bf16": transnormer_bf16,
          "transnormer_llm_385m_bf16_keep_inputs": transnormer_bf16_keep_inputs,
          "transnormer_llm_385m_bf16_recompute_product": transnormer_bf16_recompute_product,
          "llama_385m_sdpa": llama_sdpa, "llama_385m_sdpa_bf16": llama_sdpa_bf16,
          "fla_retnet": fla_retnet, "fla_retnet_fused_loss": fla_retnet_fused_loss, "fla_gla": fla_gla}

# The rows whose whole training step is captured in a CUDA graph (make_step), each with the row it captures: the same
# model, weights and data, so the same losses (bit for bit, on the same kernels)
GRAPH_ROWS = {"transnormer_llm_385m_bf16_graph": "transnormer_llm_385m_bf16",
              "transnormer_llm_385m_bf16_recompute_product_graph": "transnormer_llm_385m_bf16_recompute_product"}
MODELS.update({graph_row: MODELS[eager_row] for graph_row, eager_row in GRAPH_ROWS.items()})


def skip_reason(name, device):
    """Why row ``name`` cannot run on ``device`` at all, known before it is built (None if it can); the builders'
    own failures (a baseline's package missing) are caught where they are built (run_model)."""
    if name in GRAPH_ROWS and device.type != "cuda":
        return "CUDA graphs need CUDA (--smoke runs on the CPU)"
    return None


class MasterWeightsAdamW:
    """AdamW over fp32 master copies of a bf16 model's parameters, as Metaseq's --bf16 trains (fairseq 0.12's
    --bf16 is its TPU mode): forward and backward run in bf16 end to end (no casts of weights or activations), the
    update in fp32; after it the new weights are cast into the model. The gradients are copied into fp32 buffers
    kept for the run (one batched copy). ``capturable``: the inner AdamW's, for a step captured in a CUDA graph (its
    step counts on the GPU)."""

    def __init__(self, params, lr, fused, capturable=False):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p.detach().float() for p in self.params]
        for m in self.master:
            m.grad = torch.zeros_like(m)
        self.opt = torch.optim.AdamW(self.master, lr=lr, fused=fused, capturable=capturable)

    @torch.no_grad()
    def step(self):
        # under a CUDA graph this list is made once, at the capture: the same as at every eager step, as long as
        # the model's parameters that get a gradient do not change from step to step (a fixed model and step do not)
        pairs = [(m, p) for m, p in zip(self.master, self.params) if p.grad is not None]
        torch._foreach_copy_([m.grad for m, _ in pairs], [p.grad for _, p in pairs])
        self.opt.step()
        torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def make_optimizer(model, lr, device, capturable=False):
    """AdamW (fused on CUDA) over the model's fp32 weights, or MasterWeightsAdamW for a bf16 model; ``capturable``
    for a step captured in a CUDA graph (GRAPH_ROWS)."""
    fused = device.type == "cuda"
    if next(model.parameters()).dtype == torch.bfloat16:
        return MasterWeightsAdamW(model.parameters(), lr, fused, capturable)
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, capturable=capturable)


# ---------------------------------------------------------------------------------------------------------

START = time.perf_counter()


def log(*parts):
    """A progress line with the seconds since start: where a run's time goes (compiling, autotuning, steps)."""
    print(f"[{time.perf_counter() - START:6.0f} s]", *parts, flush=True)


def free_memory(device):
    """Memory back to the allocator and the peak counter reset: each measurement's peak is its own."""
    release(device)
    reset_peak(device)


def train_step(model, loss_fn, opt, x, y, device):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = loss_fn(model, x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def make_step(model, loss_fn, opt, s, device, graphed=False):
    """The training step as ``step(x, y) -> loss``: train_step, or with ``graphed`` train_step captured in a CUDA
    graph (CUDAGraphStep: one per batch shape, its first calls eager). The model and the chunked loss skip their
    value checks while the graph is captured; the graphed step checks every batch eagerly before its replay."""
    def step(x, y):
        return train_step(model, loss_fn, opt, x, y, device)
    if not graphed:
        return step
    vocab = model.cfg.vocab_size

    def check_batch(x, y):
        model.check_tokens(x)
        check_target_ids(y, vocab)          # as chunked_lm_loss checks them (its default ignore_index)
    # the capture falls on the last of the untimed steps where s["warmup"] allows (untimed_steps)
    return CUDAGraphStep(step, warmup=max(1, s["warmup"] - 1), check=check_batch)


def untimed_steps(step, wanted):
    """How many calls of ``step`` go untimed: ``wanted``, but for a CUDA graph at least its eager warm-up and the
    call that captures it (a capture is not a step's time)."""
    return max(wanted, step.warmup + 1) if isinstance(step, CUDAGraphStep) else wanted


def plain_loss(logits_fn):
    def loss_fn(model, x, y):
        logits = logits_fn(model, x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    return loss_fn


def measure(model, loss_fn, opt, s, seq, device, graphed=False):
    """Tokens/s (median of the timed steps), peak memory and the last loss of the step (make_step; ``graphed``:
    captured in a CUDA graph, and then also the memory reserved after the timed steps, ``reserved_gb``)."""
    batch = max(1, s["tokens"] // seq)
    g = torch.Generator(device="cpu").manual_seed(seq)
    x = torch.randint(3, s["vocab"], (batch, seq), generator=g).to(device)
    y = torch.randint(3, s["vocab"], (batch, seq), generator=g).to(device)
    free_memory(device)
    step = make_step(model, loss_fn, opt, s, device, graphed)
    untimed = untimed_steps(step, s["warmup"])
    times, loss = [], None
    for i in range(untimed + s["steps"]):
        sync(device)
        t0 = time.perf_counter()
        loss = step(x, y)
        sync(device)
        if i >= untimed:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    result = dict(tokens_per_s=batch * seq / statistics.median(times), peak_gb=peak, batch=batch,
                  loss=float(loss.detach()))
    if graphed:     # the graph's private pool stays reserved between replays; the allocated counters may not show it
        result["reserved_gb"] = torch.cuda.memory_reserved() / 1e9
    return result


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_model(name, s, device):
    torch.manual_seed(0)        # the same initial weights for the same model under either loss: comparable losses
    reason = skip_reason(name, device)
    if reason:
        return {"skipped": reason}
    try:
        model, loss_fn = MODELS[name](s)
    except Exception as e:      # a baseline's package missing or broken: the others still run, the table says why
        return {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    model.to(device)            # fp32 weights with bf16 inside autocast, or bf16 weights with fp32 master copies
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, 1e-4, device, capturable=name in GRAPH_ROWS)
    result = {"params": n_params, "seqs": {}}
    for seq in s["seqs"]:
        try:
            result["seqs"][seq] = measure(model, loss_fn, opt, s, seq, device, graphed=name in GRAPH_ROWS)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            opt.zero_grad(set_to_none=True)
            result["seqs"][seq] = {"oom": True}
        log(name, seq, result["seqs"][seq])
    del model, opt
    free_memory(device)
    return result


def variant_with_optimizer(name, s, device, lr):
    """One of our step variants (MODELS) on the device with its loss function and optimizer (make_optimizer):
    what the loss curves and the profile train (their steps: make_step)."""
    model, loss_fn = MODELS[name](s)
    model.to(device)
    return model, loss_fn, make_optimizer(model, lr, device, capturable=name in GRAPH_ROWS)


def loss_curve(name, s, device, steps):
    """The loss of the first `steps` training steps of one of our step variants, from the same initial weights on
    the same batches: a change of the step that only saves memory or time must leave this curve where it was (up
    to bf16 rounding). The batches are learnable (ids drawn from the first 1024 of the vocabulary, so the loss
    falls from ln(vocab) towards ln(1024) within the steps) rather than uniform over the vocabulary, where every
    variant would sit at ln(vocab) and agree trivially."""
    torch.manual_seed(0)
    model, loss_fn, opt = variant_with_optimizer(name, s, device, lr=1e-3)
    step = make_step(model, loss_fn, opt, s, device, graphed=name in GRAPH_ROWS)    # a graph: every call one step
    seq = s["seqs"][0]
    batch = max(1, s["tokens"] // seq)
    losses = []
    for i in range(steps):
        g = torch.Generator(device="cpu").manual_seed(10_000 + i)
        ids = torch.randint(3, 3 + min(1024, s["vocab"] - 3), (batch, seq + 1), generator=g).to(device)
        losses.append(float(step(ids[:, :-1], ids[:, 1:]).detach()))
    del model, opt, step
    free_memory(device)
    return losses


def loss_table(curves):
    """Each variant's curve against the step as it was before issue 14 (_no_recompute): largest gap over the
    steps, absolute and relative, and the first and last loss; a curve that is a string is the reason it was
    skipped. Then each CUDA graph row against the row it captures (GRAPH_ROWS)."""
    ran = {name: c for name, c in curves.items() if not isinstance(c, str)}
    base_name = "transnormer_llm_385m_no_recompute"
    base = ran.get(base_name)
    n_steps = len(next(iter(ran.values()))) if ran else 0
    lines = [f"loss of the first {n_steps} steps, against {base_name}:",
             "| variant | first loss | last loss | max abs gap | max rel gap |", "|---|---|---|---|---|"]
    for name, c in curves.items():
        if isinstance(c, str):
            lines.append(f"| {name} | skipped: {c} | | | |")
            continue
        if base is None or name == base_name:
            gaps = ("-", "-")
        else:
            gap = [abs(a - b) for a, b in zip(c, base)]
            rel = [d / abs(b) for d, b in zip(gap, base)]
            gaps = (f"{max(gap):.4f}", f"{max(rel):.2e}")
        lines.append(f"| {name} | {c[0]:.4f} | {c[-1]:.4f} | {gaps[0]} | {gaps[1]} |")
    for graph_row, eager_row in GRAPH_ROWS.items():
        if graph_row in ran and eager_row in ran:
            gap = max(abs(a - b) for a, b in zip(ran[graph_row], ran[eager_row]))
            same = "bit for bit" if ran[graph_row] == ran[eager_row] else f"max abs gap {gap:.3g}"
            lines.append(f"{graph_row} against {eager_row}: {same} over the {n_steps} steps")
    return "\n".join(lines)


def longest_sequence(s, device):
    """Doubling search for the longest sequence TransNormerLLM trains at batch 1 (one full step)."""
    model, loss_fn = transnormer_fused_loss(s)      # the [seq, vocab] logits never exist: attention bounds seq
    model = apply_activation_checkpointing(model.to(device))
    opt = make_optimizer(model, 1e-4, device)
    seq, best = s["longest_start"], None
    while seq <= s["longest_max"]:
        x = torch.randint(3, s["vocab"], (1, seq), device=device)
        try:
            free_memory(device)
            sync(device)
            t0 = time.perf_counter()
            train_step(model, loss_fn, opt, x, x, device)
            sync(device)
            peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
            best = dict(seq=seq, step_s=time.perf_counter() - t0, peak_gb=peak)
            log("longest so far", best)
        except RuntimeError as e:
            if not is_oom(e):
                raise
            opt.zero_grad(set_to_none=True)
            break
        finally:
            del x
        seq *= 2
    reached_cap = best is not None and best["seq"] * 2 > s["longest_max"]
    del model, opt
    free_memory(device)
    return dict(best or {}, search_cap_reached=reached_cap)


# Kernel categories of the profile's summary, first match wins (names lower-cased). Our Triton kernels by their
# function names (kernels/*/triton_*.py); cuBLAS/CUTLASS GEMMs by their families' name parts on Hopper.
KERNEL_CATEGORIES = (
    ("lightning attention (Triton)", ("_seg_local_kernel", "_seg_scan_kernel", "_walk_kernel")),
    ("SRMSNorm, norm+gate (Triton)", ("_srms_",)),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
    ("optimizer", ("multi_tensor_apply", "fused_adam", "adam")),
    ("cross entropy", ("softmax", "cross_entropy", "nll_loss")),
    ("reductions", ("reduce_kernel", "aten::sum", "aten::mean")),
    ("copies, casts, fills", ("copy", "cast", "fill", "aten::to", "aten::_to_copy")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "aten::mul", "aten::add", "aten::silu", "aten::sigmoid")),
)


def kernel_category(name):
    low = name.lower()
    return next((cat for cat, parts in KERNEL_CATEGORIES if any(p in low for p in parts)), "other")


def kernel_breakdown(kernels, wall_ms, steps):
    """Markdown lines: device time per step by category from (kernel name, self time in us) pairs, and the share
    of the step's wall time the device was busy (what is left is the host: launches, syncs, Python)."""
    totals = {}
    for name, us in kernels:
        cat = kernel_category(name)
        totals[cat] = totals.get(cat, 0.0) + us / 1e3 / steps
    busy = sum(totals.values())
    lines = ["| category | ms per step | share of device time |", "|---|---|---|"]
    for cat, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {ms:.2f} | {ms / busy:.1%} |" if busy else f"| {cat} | {ms:.2f} | |")
    per_step = wall_ms / steps
    lines.append(f"device busy {busy:.2f} ms of a {per_step:.2f} ms step ({busy / per_step:.1%})")
    return lines


def profile_step(name, s, device, seq, rows=30, steps=2):
    """Where one training step of our model variant ``name`` spends its time (torch.profiler): device time by
    kernel category, the share of the step the device is busy, and the kernels by total time. On the CPU (--smoke)
    the operators' own CPU time stands in for the kernels. A CUDA graph row profiles its replays (its warm-up and
    capture before the profile); a row that cannot run on the device says why."""
    reason = skip_reason(name, device)
    if reason:
        return f"profile of {name}: skipped ({reason})"
    model, loss_fn, opt = variant_with_optimizer(name, s, device, lr=1e-4)
    step = make_step(model, loss_fn, opt, s, device, graphed=name in GRAPH_ROWS)
    batch = max(1, s["tokens"] // seq)
    x = torch.randint(3, s["vocab"], (batch, seq), device=device)
    for _ in range(untimed_steps(step, 3)):
        step(x, x)
    sync(device)
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, x)
        sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3
    averages = prof.key_averages()
    kernels = [(name, us) for name, _, us in profiled_kernels(averages, cuda)]
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    text = averages.table(sort_by=key, row_limit=rows)
    if cuda:    # the host's side: where the Python and autograd time of the step goes
        text += "\n\n" + averages.table(sort_by="cpu_time_total", row_limit=rows // 2)
    del model, opt, step
    free_memory(device)
    head = f"profile of {name}: {steps} steps, seq {seq}, batch {batch}" + ("" if cuda else " (CPU operators)")
    return "\n".join([head, ""] + kernel_breakdown(kernels, wall_ms, steps) + ["", text])


def memory_text(measurements):
    """The largest peak of some measurements (GB), with the largest memory reserved after them where measured (a
    CUDA graph row: its private pool, which the peak of allocated memory may not show)."""
    peak = max((m["peak_gb"] for m in measurements), default=float("nan"))
    reserved = [m["reserved_gb"] for m in measurements if "reserved_gb" in m]
    return f"{peak:.1f}" + (f" (reserved {max(reserved):.1f})" if reserved else "")


# the other models our step is compared with (the fp32 LLaMA for the fp32 step; the bf16 steps take the bf16 LLaMA)
ANCHORS = ("llama_385m_sdpa", "fla_retnet", "fla_retnet_fused_loss", "fla_gla")


def table(results, s, longest):
    seqs = s["seqs"]
    lines = ["| model | params | " + " | ".join(f"seq {n} tokens/s" for n in seqs) + " | peak memory (GB) |",
             "|---|---|" + "---|" * len(seqs) + "---|"]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |" + " |" * len(seqs) + " |")
            continue
        cells = [("OOM" if "oom" in r["seqs"][n] else f"{r['seqs'][n]['tokens_per_s'] / 1e3:.1f}k") for n in seqs]
        peak = memory_text([m for m in r["seqs"].values() if "oom" not in m])
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | " + " | ".join(cells) + f" | {peak} |")
    ours = results.get("transnormer_llm_385m", {}).get("seqs", {})

    def ratio(other, n):
        o = results.get(other, {}).get("seqs", {}).get(n, {})
        if "tokens_per_s" not in o or "tokens_per_s" not in ours.get(n, {}):
            return "n/a"
        return f"{ours[n]['tokens_per_s'] / o['tokens_per_s']:.2f}x"
    lines.append("")
    for other in ANCHORS if ours else ():
        if other in results:
            lines.append(f"ours / {other}: " + ", ".join(f"seq {n}: {ratio(other, n)}" for n in seqs))
    def lever(label, before, after):      # one change of our step: what it does to speed, memory and the loss
        old = results.get(before, {}).get("seqs", {})
        new = results.get(after, {}).get("seqs", {})
        both = [n for n in seqs if "tokens_per_s" in old.get(n, {}) and "tokens_per_s" in new.get(n, {})]
        if both:
            lines.append(f"{label} ({after} / {before}): " + ", ".join(
                f"seq {n}: tokens/s {new[n]['tokens_per_s'] / old[n]['tokens_per_s']:.2f}x, peak "
                f"{memory_text([old[n]])} -> {memory_text([new[n]])} GB, last loss {old[n]['loss']:.4f} -> "
                f"{new[n]['loss']:.4f}" for n in both))
    lever("linear layers' inputs recomputed", "transnormer_llm_385m_no_recompute", "transnormer_llm_385m")
    lever(f"chunked LM head + loss, {s['loss_chunk']} tokens a chunk", "transnormer_llm_385m",
          "transnormer_llm_385m_fused_loss")
    lever("bf16 weights, fp32 master copies", "transnormer_llm_385m_fused_loss", "transnormer_llm_385m_bf16")
    lever("linear layers' inputs kept (bf16 weights)", "transnormer_llm_385m_bf16",
          "transnormer_llm_385m_bf16_keep_inputs")
    lever("all kept but SGLU's product (bf16 weights)", "transnormer_llm_385m_bf16",
          "transnormer_llm_385m_bf16_recompute_product")
    for graph_row, eager_row in GRAPH_ROWS.items():
        lever("the whole step as one CUDA graph", eager_row, graph_row)
    for mine, other in ((m, a) for m in ("transnormer_llm_385m_bf16", "transnormer_llm_385m_bf16_keep_inputs",
                                         "transnormer_llm_385m_bf16_recompute_product", *GRAPH_ROWS)
                        for a in ("llama_385m_sdpa_bf16", *ANCHORS[1:])):
        a, b = (results.get(n, {}).get("seqs", {}) for n in (mine, other))
        both = [n for n in seqs if "tokens_per_s" in a.get(n, {}) and "tokens_per_s" in b.get(n, {})]
        if both:
            lines.append(f"{mine} / {other}: " + ", ".join(
                f"seq {n}: {a[n]['tokens_per_s'] / b[n]['tokens_per_s']:.2f}x" for n in both))
    if all("tokens_per_s" in ours.get(n, {}) for n in (seqs[0], seqs[-1])):
        lines.append(f"ours seq {seqs[-1]} / seq {seqs[0]}: "
                     f"{ours[seqs[-1]]['tokens_per_s'] / ours[seqs[0]]['tokens_per_s']:.2f}")
    if longest.get("seq"):
        cap = " (search cap reached)" if longest["search_cap_reached"] else ""
        lines.append(f"longest sequence at batch 1 with activation checkpointing: {longest['seq']}{cap}, "
                     f"{longest['step_s']:.1f} s/step, peak {longest['peak_gb']:.1f} GB")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (checks the script, measures nothing)")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated subset of " + ",".join(MODELS) + " ('' for the longest-sequence search only)")
    ap.add_argument("--no-longest", action="store_true", help="skip the longest-sequence search")
    ap.add_argument("--profile", default="", metavar="SEQ[,SEQ]",
                    help="also profile our training step at these sequence lengths (each of our variants among "
                         "--models): device time by kernel category, device busy share, kernels by time")
    ap.add_argument("--steps", type=int, help="timed steps per measurement (default 10)")
    ap.add_argument("--warmup", type=int, help="untimed steps before them (default 3)")
    ap.add_argument("--loss-steps", type=int, default=0, metavar="N",
                    help="also train each of our step variants among --models N steps from the same weights on the "
                         "same batches and compare their loss curves (issue 14: the first 50 steps unchanged)")
    ap.add_argument("--loss-chunk", type=int, help="tokens per chunk of the chunked LM head + loss (default 4096)")
    args = ap.parse_args()
    s = dict(SMOKE if args.smoke else FULL)
    s.update({k: getattr(args, k) for k in ("steps", "warmup", "loss_chunk") if getattr(args, k) is not None})
    if s["steps"] < 1:
        sys.exit("--steps must be at least 1")
    try:
        profile_seqs = [int(x) for x in args.profile.split(",") if x]
    except ValueError:
        sys.exit(f"--profile takes sequence lengths such as 2048,32768, got {args.profile!r}")
    if args.smoke:
        # the CPU dev venv's torchaudio does not match its torch and fails to load; transformers imports it
        # (for audio helpers this script never uses) whenever it is installed, so hide it
        sys.modules.setdefault("torchaudio", None)
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on CPU")
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
        try:    # the model falls back to the PyTorch block form without it: say which one is measured
            from tnllm_kernels.lightning_attention.triton_chunk import lightning_attention_triton  # noqa: F401
            print("TransNormerLLM attention: Triton kernel", flush=True)
        except ImportError as e:
            print(f"TransNormerLLM attention: PyTorch block form (no Triton kernel: {e})", flush=True)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"unknown models {unknown}; known: {list(MODELS)}")
    results, longest, curves = {}, {}, {}
    ours = [n for n in names if n.startswith("transnormer_llm_385m")]     # our step variants among --models

    def current_report():
        return table(results, s, longest) + ("\n\n" + loss_table(curves) if curves else "")
    # the loss curves first (a run cut short, e.g. by a slow autotuning model last, still has them); the report is
    # rewritten after each curve and each model, so a cut run keeps what it measured
    for name in ours if args.loss_steps else []:
        log("loss curve", name)
        reason = skip_reason(name, device)
        curves[name] = reason if reason else loss_curve(name, s, device, args.loss_steps)
        write_report(current_report(), results, longest, curves)
    for name in names:
        log("start", name)
        results[name] = run_model(name, s, device)
        write_report(current_report(), results, longest, curves)
    if not args.no_longest:
        longest = longest_sequence(s, device)
    report = current_report()
    for seq in profile_seqs:    # each of our variants among --models (or the default model when none is)
        for name in ours or ["transnormer_llm_385m"]:
            log("profile", name, seq)
            report += "\n\n" + profile_step(name, s, device, seq)
            write_report(report, results, longest, curves)
    print("\n" + report)
    write_report(report, results, longest, curves)


def write_report(report, results, longest, loss_curves=None):
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "train_throughput.md"), "w") as f:
            f.write(report + "\n")
        with open(os.path.join(out, "train_throughput.json"), "w") as f:
            json.dump(dict(results=results, longest=longest, loss_curves=loss_curves or {}), f, indent=1, default=str)

if __name__ == "__main__":
    main()
