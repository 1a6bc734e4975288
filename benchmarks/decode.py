"""Generation on one GPU: prefill time, per-token decode latency and memory of TransNormerLLM-385M next to a
LLaMA of the same size (HF, SDPA attention, KV cache), in one run, bf16 weights, greedy decoding.

For each model, batch (1, 16) and prompt length (1k, 8k, 32k, 128k random tokens):

* prefill ms: the prompt through the model, the LM head on the last position only, the greedy token. Timed once,
  after an untimed prefill of the same shape (so no Triton/cuBLAS first-call cost is timed; the first run's time
  is kept in the JSON as prefill_first_ms). Ours is fed in pieces of at most 2^18 tokens per call (16k per row
  at batch 16, the whole prompt at batch 1) carrying its DecodeState, which bounds activation memory; LLaMA gets
  the whole prompt in one call (HF's usual prefill: flash SDPA with is_causal, logits_to_keep=1), nothing is
  ever [B, N, vocab].
* per-token ms: the median over 64 one-token steps after 8 warm-up steps, each step `model(last token, cache)`
  -> greedy token, eager, torch.cuda.synchronize around each step. Ours: the model's own recurrence step
  (`model(tok, state=state)`); LLaMA: `model(input_ids=tok, past_key_values=cache, use_cache=True)` with HF's
  DynamicCache (the default; it grows by a concatenation per step) or, with --llama-cache static, a StaticCache
  sized for the run. If tnllm_plugin.generation has a CUDA-graph decoder, its per-token ms is one more column
  (it continues from the state the eager steps left; our step's cost does not depend on the position; a step is
  the decoder's call, synchronized, as above), and the generation loop's is another: the mean per token of
  `generation.decode_from`, greedy, as generate() runs it (the next step queued before the host reads a step's
  tokens), continuing from the graph decoder's state.
* peak GB: torch.cuda.max_memory_allocated during the decode steps (weights, state/cache, step temporaries;
  GB = 1e9 bytes). state bytes: our DecodeState (fp32 [B, H, Dk, Dv] per layer, the same for every prompt
  length) or LLaMA's KV cache after the prefill.
* A cell that runs out of memory is recorded as OOM and the run goes on; a LLaMA cell whose KV cache alone would
  not fit in the free device memory is not attempted (OOM, "predicted"). Cells not started within the time
  budget (--budget-s, 330 s from the start) are marked skipped. The tables go to $OUT after every cell.
* Checks, first, in fp32 (the models cast for them, then back) on the smallest prompt at batch 2: our prefill in
  4 pieces carrying the state gives the last-position logits of one single call; the greedy token equals the
  argmax of the full forward (or is within rounding of it); the next step's logits from the state equal a full
  forward over prompt + token (and so do the graph decoder's, if there is one). For LLaMA the cached prefill and
  cached step against full forwards without cache. Then the issue's checks: ours per-token ms and peak memory at
  128k within 10% of 1k, and below LLaMA's from 8k on, per batch.

    source benchmarks/device_env.sh && python benchmarks/decode.py   # GPU; writes $OUT/decode.md, decode.json
    python benchmarks/decode.py --smoke      # tiny models on CPU, prompts 16/64/128, batch 1/2: every code path
"""
import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmark_common import free_memory, llama_model, profiled_kernels, reset_peak, sync, transnormer_model  # noqa: E402

OURS, LLAMA = "transnormer_llm_385m", "llama_385m_sdpa"
FULL = dict(vocab=64000, layers=24, dim=1024, heads=8, ffn=2816, batches=(1, 16),
            prompts=(1024, 8192, 32768, 131072), warmup=8, steps=64, tokens_per_call=1 << 18,
            check_batch=2, check_pieces=4, budget_s=330.0, mem_limit=None, fake_oom=None)
# smoke: mem_limit makes the LLaMA cell at batch 2 x 128 a predicted OOM, fake_oom raises in another cell
SMOKE = dict(vocab=256, layers=2, dim=64, heads=4, ffn=128, batches=(1, 2), prompts=(16, 64, 128), warmup=2,
             steps=4, tokens_per_call=64, check_batch=2, check_pieces=4, budget_s=120.0, mem_limit=100_000,
             fake_oom=f"{LLAMA}:1:128")
# The checks run the models in fp32 (cast for the check, back to bf16 after): in bf16 two correct orders of the
# same sums already differ by a few % on these random-weight models, which would hide a wrong state or position.
CHECK_DTYPE, CHECK_TOL = torch.float32, 1e-3       # max |logits - reference| / max |reference|


# ---------------------------------------------------------------------------------------------------------
# Models behind one interface: prefill(tokens) -> (cache, last logits), step(cache, tok) -> (cache, logits),
# full_last_logits(tokens) (no cache), cache_bytes(cache), predicted_bytes(batch, total length) or None

class Ours:
    name = OURS

    def __init__(self, s, device, dtype):
        self.model = transnormer_model(s, full=s is FULL).to(device=device, dtype=dtype).eval()
        self.tokens_per_call = s["tokens_per_call"]

    def prefill(self, tokens, piece=None):
        b, n = tokens.shape
        piece = piece or max(1, self.tokens_per_call // b)
        state = None
        for i in range(0, n, piece):
            hidden, state = self.model(tokens[:, i:i + piece], state=state, use_cache=True, return_hidden=True)
        return state, self.model.lm_head(hidden[:, -1])

    def step(self, state, tok):
        logits, state = self.model(tok, state=state)
        return state, logits[:, -1]

    def full_last_logits(self, tokens):
        hidden, _ = self.model(tokens, return_hidden=True)
        return self.model.lm_head(hidden[:, -1])

    def cache_bytes(self, state):
        return sum(t.numel() * t.element_size() for t in state.kv)

    def predicted_bytes(self, batch, length):
        return None


class Llama:
    name = LLAMA

    def __init__(self, s, device, dtype, cache_kind="dynamic"):
        self.extra = s["warmup"] + s["steps"] + 2        # positions the decode steps (and the check) add
        self.model = llama_model(s, max(s["prompts"]) + self.extra).to(device=device, dtype=dtype).eval()
        self.cache_kind = cache_kind
        params = inspect.signature(self.model.forward).parameters
        self.keep = next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    def _new_cache(self, length):
        if self.cache_kind == "dynamic":
            return None                                    # HF makes its DynamicCache
        from transformers import StaticCache
        return StaticCache(config=self.model.config, max_cache_len=length + self.extra)

    def _last_logits(self, tokens, cache, use_cache):
        if self.keep is not None:
            out = self.model(input_ids=tokens, past_key_values=cache, use_cache=use_cache, **self.keep)
            return out.past_key_values, out.logits[:, -1]
        out = self.model.model(input_ids=tokens, past_key_values=cache, use_cache=use_cache)
        return out.past_key_values, self.model.lm_head(out.last_hidden_state[:, -1])

    def prefill(self, tokens, piece=None):              # one call, whatever piece says
        return self._last_logits(tokens, self._new_cache(tokens.shape[1]), True)

    def step(self, cache, tok):
        out = self.model(input_ids=tok, past_key_values=cache, use_cache=True)
        return out.past_key_values, out.logits[:, -1]

    def full_last_logits(self, tokens):
        return self._last_logits(tokens, None, False)[1]

    def cache_bytes(self, cache):
        return sum(t.numel() * t.element_size() for t in cache_tensors(cache))

    def predicted_bytes(self, batch, length):
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        elem = next(self.model.parameters()).element_size()
        return 2 * c.num_hidden_layers * batch * (length + self.extra) * c.num_key_value_heads * head_dim * elem


def cache_tensors(cache):
    """The key/value tensors of an HF cache (transformers 5: cache.layers[i].keys/values; 4.x: key_cache...)."""
    if hasattr(cache, "layers"):
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
        tensors = [t for pair in pairs for t in pair]
    else:
        tensors = list(cache.key_cache) + list(cache.value_cache)
    return [t for t in tensors if torch.is_tensor(t)]


def graph_decoder(device):
    """(decoder class, label): tnllm_plugin.generation's CUDA-graph decoder when the module and CUDA are there.
    Its contract: ``Decoder(model, state with per-row positions)``, then ``decoder(tokens [B]) -> logits [B, V]``.
    Without CUDA (--smoke) its EagerDecoder, which has the same contract, stands in to exercise this path."""
    try:
        import tnllm_plugin.generation as generation
    except Exception as e:       # not written yet, or broken mid-edit: the column is left out
        return None, f"not available ({short_error(e)})"
    found = next((getattr(generation, n) for n in ("CudaGraphDecoder", "CUDAGraphDecoder")
                  if hasattr(generation, n)), None)
    if found is None:
        return None, "not in tnllm_plugin.generation"
    if device.type == "cuda":
        return found, f"generation.{found.__name__}"
    stand_in = getattr(generation, "EagerDecoder", None)
    return (stand_in, "generation.EagerDecoder standing in (no CUDA)") if stand_in else (None, "needs CUDA")


def with_positions(state, device):
    """Our prefill state with per-row positions (all rows at state.offset), as the graph decoder wants."""
    return replace(state, positions=torch.full((state.kv[0].shape[0],), state.offset, dtype=torch.long,
                                               device=device))


# ---------------------------------------------------------------------------------------------------------
# Measuring

def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")


def free_bytes(s, device):
    if s["mem_limit"] is not None:
        return s["mem_limit"]
    return torch.cuda.mem_get_info()[0] if device.type == "cuda" else math.inf


def make_prompt(s, batch, length, device):
    g = torch.Generator(device="cpu").manual_seed(batch * 1_000_003 + length)
    return torch.randint(3, s["vocab"], (batch, length), generator=g).to(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - t0) * 1e3


def prefill_greedy(runner, tokens):
    cache, logits = runner.prefill(tokens)
    return cache, logits.argmax(-1, keepdim=True)


def timed_prefill(runner, tokens, device):
    """Untimed prefill of this shape, then the timed one. Returns (cache, greedy token, first ms, ms)."""
    (cache, tok), first_ms = timed(lambda: prefill_greedy(runner, tokens), device)
    del cache, tok
    free_memory(device)
    (cache, tok), ms = timed(lambda: prefill_greedy(runner, tokens), device)
    return cache, tok, first_ms, ms


def decode(step, cache, tok, warmup, steps, device):
    """Greedy one-token steps; returns (per-step ms of the timed steps, cache, last token)."""
    times = []
    for i in range(warmup + steps):
        (cache, logits), ms = timed(lambda: step(cache, tok), device)
        tok = logits.argmax(-1, keepdim=True)
        if i >= warmup:
            times.append(ms)
    return times, cache, tok


def measure_cell(runner, s, batch, length, device, fake_oom, graph):
    tokens = make_prompt(s, batch, length, device)
    reset_peak(device)
    cache, tok, first_ms, prefill_ms = timed_prefill(runner, tokens, device)
    r = dict(prefill_ms=prefill_ms, prefill_first_ms=first_ms, prefill_peak_gb=peak_gb(device),
             state_bytes=runner.cache_bytes(cache))
    if fake_oom:
        raise torch.cuda.OutOfMemoryError("fake OOM (--fake-oom)")
    del tokens
    free_memory(device)
    reset_peak(device)
    times, cache, tok = decode(runner.step, cache, tok, s["warmup"], s["steps"], device)
    r.update(per_token_ms=statistics.median(times), per_token_min_ms=min(times), peak_gb=peak_gb(device))
    if graph is not None:
        holder = [cache]            # handed over, so that the graph decoder's own copy is the only state left
        del cache
        r.update(graph_cell(graph, runner, holder, tok, s, device))
    return r


def graph_cell(graph, runner, holder, tok, s, device):
    """Per-token ms of the graph decoder, continuing from the state the eager steps reached (our step costs the
    same at every position), then of the generation loop from where the graph decoder left off. Their errors
    are recorded, never raised: it is another module's work."""
    try:
        decoder = graph(runner.model, with_positions(holder.pop(), device))
        free_memory(device)
        reset_peak(device)
        last = {}

        def step(_, t):
            last["logits"] = decoder(t[:, 0])
            return None, last["logits"]

        times, _, _ = decode(step, None, tok, s["warmup"], s["steps"], device)
        r = dict(graph_per_token_ms=statistics.median(times), graph_peak_gb=peak_gb(device))
    except Exception as e:          # an OOM here too: the eager numbers of the cell stay
        if not is_oom(e):
            traceback.print_exc()
        return dict(graph_error=short_error(e))
    state, logits = decoder.state, last["logits"]
    del decoder, last
    return {**r, **loop_cell(runner, state, logits, s, device)}


def loop_cell(runner, state, logits, s, device):
    """Per-token ms of the generation loop that generate() runs (tnllm_plugin.generation.decode_from: greedy,
    through its CUDA-graph decoder on a GPU, each step queued before the host reads the tokens of the one before):
    the mean time from one step's tokens on the host to the next's over s["steps"] steps after s["warmup"] (a
    pipelined loop is judged by its rate; a median of the intervals could hide a stall)."""
    try:
        from tnllm_plugin.generation import SamplingConfig, decode_from
        stamps = []
        greedy = SamplingConfig(max_new_tokens=s["warmup"] + s["steps"] + 1)
        for _ in decode_from(runner.model, state, logits, greedy, cuda_graph=device.type == "cuda"):
            stamps.append(time.perf_counter())
        return dict(loop_per_token_ms=(stamps[-1] - stamps[s["warmup"]]) * 1e3 / s["steps"])
    except Exception as e:
        if not is_oom(e):
            traceback.print_exc()
        return dict(loop_error=short_error(e))


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def short_error(e):
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:200]


def run_cell(runner, s, batch, length, device, deadline, fake, graph):
    if time.perf_counter() > deadline:
        return {"skipped": "time budget"}
    need = runner.predicted_bytes(batch, length)
    if need is not None and need > free_bytes(s, device):
        return {"oom": f"predicted: cache {need / 1e9:.3g} GB > free {free_bytes(s, device) / 1e9:.3g} GB",
                "state_bytes": need}
    try:
        return measure_cell(runner, s, batch, length, device, fake, graph)
    except Exception as e:
        if is_oom(e):
            return {"oom": short_error(e)}
        traceback.print_exc()
        return {"error": short_error(e)}


# ---------------------------------------------------------------------------------------------------------
# Correctness checks (smallest prompt)

def close(got, ref, tol):
    err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
    return dict(rel_err=err, ok=err <= tol)


def same_greedy(tok, ref, tol):
    """The greedy token equals argmax(ref), or ref at that token is within rounding of ref's maximum."""
    ref = ref.float()
    exact = bool((tok[:, 0] == ref.argmax(-1)).all())
    gap = (ref.max(-1).values - ref.gather(-1, tok)[:, 0]).max().item()
    return dict(exact=exact, ok=exact or gap <= tol * ref.abs().max().item())


def check(runner, s, device, graph=None, tol=CHECK_TOL):
    n, b = min(s["prompts"]), s["check_batch"]
    tokens = make_prompt(s, b, n, device)
    ref = runner.full_last_logits(tokens)
    cache, got = runner.prefill(tokens, piece=max(1, n // s["check_pieces"]))
    tok = got.argmax(-1, keepdim=True)
    prefilled = cache
    cache, got_step = runner.step(cache, tok)
    ref_step = runner.full_last_logits(torch.cat([tokens, tok], dim=1))
    r = dict(prefill=close(got, ref, tol), greedy=same_greedy(tok, ref, tol), step=close(got_step, ref_step, tol),
             tolerance=tol, prompt=n, batch=b)
    r["ok"] = all(r[k]["ok"] for k in ("prefill", "greedy", "step"))
    if graph is not None:
        r["graph_step"] = check_graph(graph, runner, prefilled, tok, ref_step, tol, device)
    return r


def check_graph(graph, runner, state, tok, ref_step, tol, device):
    """The graph decoder's first step from the prefill state against the full forward (reported apart)."""
    try:
        return close(graph(runner.model, with_positions(state, device))(tok[:, 0]), ref_step, tol)
    except Exception as e:
        traceback.print_exc()
        return dict(error=short_error(e), ok=False)


def check_line(name, c):
    if "error" in c:
        return f"check {name}: FAIL ({c['error']})"
    what = "prefill in pieces" if name == OURS else "cached prefill"
    line = (f"check {name}: {'OK' if c['ok'] else 'FAIL'} (fp32, prompt {c['prompt']}, batch {c['batch']}: "
            f"{what} vs one full forward rel err {c['prefill']['rel_err']:.2e}, greedy token "
            f"{'same' if c['greedy']['exact'] else 'within rounding' if c['greedy']['ok'] else 'DIFFERENT'}, "
            f"next step from the cache vs full forward rel err {c['step']['rel_err']:.2e}; "
            f"tolerance {c['tolerance']:g})")
    g = c.get("graph_step")
    if g is not None:
        detail = g["error"] if "error" in g else f"rel err {g['rel_err']:.2e}"
        line += f"\ncheck {name} graph decoder step vs full forward: {'OK' if g['ok'] else 'FAIL'} ({detail})"
    return line


# ---------------------------------------------------------------------------------------------------------
# Report

def fmt_cell(r, key, spec):
    if "oom" in r:
        return "OOM*" if r["oom"].startswith("predicted") else "OOM"
    if "skipped" in r or "error" in r:
        return "skipped" if "skipped" in r else "error"
    v = r.get(key)
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def fmt_bytes(n):
    if n is None:
        return "n/a"
    return next(f"{n / div:,.{digits}f} {unit}" for div, unit, digits in
                ((1e9, "GB", 2), (1e6, "MB", 1), (1e3, "kB", 1), (1, "B", 0)) if n >= div or unit == "B")


def table_lines(results, s, with_graph):
    head = "| model | batch | prompt | prefill ms | per-token ms |" + (
        " per-token ms (CUDA graph) | per-token ms (generation loop) |" * with_graph)
    lines = [head + " peak GB (decode) | state / KV bytes |",
             "|---|---|---|---|---|" + "---|---|" * with_graph + "---|---|"]
    for name, res in results.items():
        for key, r in res.get("cells", {}).items():
            b, n = key_of(key)
            graph = f" {graph_text(name, r, 'graph')} | {graph_text(name, r, 'loop')} |"
            lines.append(f"| {name} | {b} | {n} | {fmt_cell(r, 'prefill_ms', '.1f')} | "
                         f"{fmt_cell(r, 'per_token_ms', '.3f')} |" + (graph * with_graph) +
                         f" {fmt_cell(r, 'peak_gb', '.3f')} | {fmt_bytes(r.get('state_bytes'))} |")
    return lines


def graph_text(name, r, column):
    if name != OURS:
        return "-"
    return "error" if f"{column}_error" in r else fmt_cell(r, f"{column}_per_token_ms", ".3f")


def cell_key(batch, length):
    return f"b{batch}_n{length}"


def key_of(key):
    b, n = key[1:].split("_n")
    return int(b), int(n)


def ratio(a, b):
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def fmt_ratio(x, good):
    return "n/a" if x is None else f"{x:.3f} ({'ok' if good(x) else 'NOT MET'})"


# (label, key) of the decode metrics the issue's checks compare; the graph one only where it was measured
# (label, our key, LLaMA's key to compare with, whether every cell has it)
METRICS = (("per-token ms", "per_token_ms", "per_token_ms", True),
           ("per-token ms (graph)", "graph_per_token_ms", "per_token_ms", False),
           ("per-token ms (generation loop)", "loop_per_token_ms", "per_token_ms", False),
           ("peak GB", "peak_gb", "peak_gb", True))


def flat_lines(results, s):
    """Ours at the longest prompt against the shortest: per-token ms and peak memory within 10%."""
    ours = results.get(OURS, {}).get("cells", {})
    lo, hi = min(s["prompts"]), max(s["prompts"])
    lines = []
    for b in s["batches"]:
        a, z = ours.get(cell_key(b, lo), {}), ours.get(cell_key(b, hi), {})
        parts = [f"{what} {fmt_ratio(ratio(z.get(k), a.get(k)), lambda x: x <= 1.10)}"
                 for what, k, _, always in METRICS if always or k in a or k in z]
        lines.append(f"ours batch {b}, prompt {hi} / {lo}: " + ", ".join(parts))
    return lines


def versus_lines(results, s):
    """Ours against LLaMA from the second prompt length on: per-token ms and peak memory below LLaMA's."""
    ours, llama = results.get(OURS, {}).get("cells", {}), results.get(LLAMA, {}).get("cells", {})
    lines = []
    for b in s["batches"]:
        parts = []
        for n in sorted(s["prompts"])[1:]:
            o, l = ours.get(cell_key(b, n), {}), llama.get(cell_key(b, n), {})
            if "oom" in l and "per_token_ms" in o:
                parts.append(f"prompt {n}: LLaMA OOM (ok)")
                continue
            pairs = [(what, k, kl) for what, k, kl, always in METRICS if always or k in o]
            parts.append(f"prompt {n}: " + ", ".join(
                f"{what} {fmt_ratio(ratio(o.get(k), l.get(kl)), lambda x: x < 1)}" for what, k, kl in pairs))
        lines.append(f"ours / LLaMA, batch {b}: " + "; ".join(parts))
    return lines


def legend(s):
    return (f"bf16 weights, greedy. prefill ms: ours in pieces of <= {s['tokens_per_call']} tokens per call "
            f"carrying its state, LLaMA in one call; both timed after an untimed prefill of the same shape. "
            f"per-token ms: median of {s['steps']} steps after {s['warmup']} warm-up steps, each synchronized "
            f"(generation loop: the mean over as many steps of generation.decode_from, which does not wait for a "
            f"step before queuing the next). peak GB: "
            f"torch.cuda.max_memory_allocated during the decode steps (1e9 bytes).")


def report(results, s, meta):
    with_graph = any("graph_per_token_ms" in r or "graph_error" in r
                     for res in results.values() for r in res.get("cells", {}).values())
    lines = [meta["header"], legend(s), ""]
    lines += [f"{name}: {res['params'] / 1e6:.1f}M parameters" for name, res in results.items() if "params" in res]
    lines += [check_line(name, res["check"]) for name, res in results.items() if "check" in res]
    lines += [f"{name}: skipped ({res['skipped']})" for name, res in results.items() if "skipped" in res]
    lines += [""] + table_lines(results, s, with_graph) + [""]
    lines += flat_lines(results, s) + versus_lines(results, s)
    notes = [f"{name} {key}: {r[err]}" for name, res in results.items()
             for key, r in res.get("cells", {}).items() for err in ("graph_error", "loop_error") if err in r][:3]
    notes += [f"{name} {key}: {r.get('oom') or r.get('error')}" for name, res in results.items()
              for key, r in res.get("cells", {}).items() if "oom" in r or "error" in r]
    lines += [""] + ["OOM* = not attempted: the KV cache alone exceeds the free device memory."] + notes
    return "\n".join(lines)


def no_nan(x):
    """NaN (no memory figures on CPU) as null: strict JSON."""
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def write_outputs(results, s, meta, out):
    text = report(results, s, meta)
    if out:
        with open(os.path.join(out, "decode.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out, "decode.json"), "w") as f:
            json.dump(no_nan(dict(meta=meta, results=results)), f, indent=1, default=str)
    return text


# ---------------------------------------------------------------------------------------------------------

def build(name, s, device, dtype, args):
    if name == OURS:
        return Ours(s, device, dtype)
    return Llama(s, device, dtype, args.llama_cache)


def run_model(name, s, device, dtype, args, deadline, emit):
    try:
        runner = build(name, s, device, dtype, args)
    except Exception as e:     # the baseline's package missing or broken: ours still runs, the table says why
        traceback.print_exc()
        return {"skipped": short_error(e)}
    res = {"params": sum(p.numel() for p in runner.model.parameters()), "cells": {}}
    emit(name, res)
    graph = graph_decoder(device)[0] if name == OURS else None
    with torch.no_grad():
        try:
            runner.model.to(CHECK_DTYPE)
            res["check"] = check(runner, s, device, graph)
        except Exception as e:
            traceback.print_exc()
            res["check"] = {"error": short_error(e), "ok": False}
        finally:
            runner.model.to(dtype)
        print(check_line(name, res["check"]), flush=True)
        if "error" in res["check"].get("graph_step", {}):
            graph = None            # it could not even run one step: no column rather than an error per cell
        free_memory(device)
        for b in s["batches"]:
            for n in s["prompts"]:
                fake = args.fake_oom == f"{name}:{b}:{n}"
                res["cells"][cell_key(b, n)] = run_cell(runner, s, b, n, device, deadline, fake, graph)
                free_memory(device)
                print(name, f"batch {b}", f"prompt {n}", res["cells"][cell_key(b, n)], flush=True)
                emit(name, res)
    del runner
    free_memory(device)
    return res


def profile_graph_decoder(s, device, dtype, batch, steps=20, rows=25):
    """Markdown: the kernels one CUDA-graph decode step of our model runs at ``batch`` (torch.profiler over
    ``steps`` replays after a prefill of the first prompt length): calls and device microseconds per token by
    kernel, and how much of the step's wall time the device is busy (the rest is gaps between kernels)."""
    graph, label = graph_decoder(device)
    if graph is None:
        return f"profile of the graph decoder at batch {batch}: skipped ({label})"
    cuda = device.type == "cuda"       # on the CPU (--smoke) the eager stand-in's operators, to check the code
    runner = Ours(s, device, dtype)
    with torch.no_grad():
        state, logits = runner.prefill(make_prompt(s, batch, s["prompts"][0], device))
        decoder = graph(runner.model, with_positions(state, device))
        tok = logits.argmax(-1)
        for _ in range(5):
            tok = decoder(tok).argmax(-1)
        sync(device)
        activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = decoder(tok).argmax(-1)
            sync(device)
            wall_us = (time.perf_counter() - t0) * 1e6 / steps
    kernels = [(name, calls / steps, us / steps) for name, calls, us in profiled_kernels(prof.key_averages(), cuda)]
    busy = sum(us for _, _, us in kernels)
    lines = [f"**{label} at batch {batch}, prompt {s['prompts'][0]}**: {sum(c for _, c, _ in kernels):.0f} "
             f"kernels per token, device busy {busy:.0f} us of {wall_us:.0f} us per token (wall, with the argmax "
             f"and the host's replay call)", "", "| kernel | calls per token | us per token | us per call |",
             "|---|---|---|---|"]
    for name, calls, us in sorted(kernels, key=lambda k: -k[2])[:rows]:
        lines.append(f"| {name[:90]} | {calls:.0f} | {us:.1f} | {us / max(calls, 1):.2f} |")
    del runner, decoder, state
    free_memory(device)
    return "\n".join(lines)


def header(device, args):
    parts = [f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
             f"torch {torch.__version__}"]
    try:
        import transformers
        parts.append(f"transformers {transformers.__version__}")
    except Exception:
        pass
    if device.type == "cuda":
        try:
            from tnllm_kernels.lightning_attention.triton_chunk import lightning_attention_triton  # noqa: F401
            parts.append("ours: Triton lightning attention")
        except ImportError as e:
            parts.append(f"ours: PyTorch block form ({e})")
    parts.append(f"LLaMA cache: {args.llama_cache}")
    parts.append("graph decoder: " + graph_decoder(device)[1])
    if device.type == "cuda":
        from tnllm_kernels.gla_decode.triton_step import pdl_launch
        pdl = pdl_launch(torch.empty(0, device=device))
        parts.append("decode kernels: " + ("programmatic dependent launch" if pdl else "launched one after the other"))
    return ", ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU (checks the script, measures nothing)")
    ap.add_argument("--models", default=f"{OURS},{LLAMA}", help="comma-separated subset of the two")
    ap.add_argument("--llama-cache", choices=("dynamic", "static"), default="dynamic",
                    help="HF cache for LLaMA: DynamicCache (default) or a StaticCache sized for the run")
    ap.add_argument("--budget-s", type=float, default=None, help="start no cell after this many seconds")
    ap.add_argument("--fake-oom", default=None, metavar="MODEL:BATCH:PROMPT",
                    help="raise an OOM in that cell after its prefill (tests the handler)")
    ap.add_argument("--prompts", help="comma-separated prompt lengths (default: 1k, 8k, 32k, 128k)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default: 1, 16)")
    ap.add_argument("--no-fused-step", action="store_true",
                    help="our one-token step as the PyTorch composition instead of the fused decode kernels "
                         "(tnllm_kernels.gla_decode): the A/B of that change, same weights and tokens")
    ap.add_argument("--no-fused-linears", action="store_true",
                    help="our block's linear layers as cuBLAS GEMVs beside separate norm, gate, product and add "
                         "kernels instead of tnllm_kernels.decode_linear's fused GEMVs (the A/B of that change)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="the decode kernels launched one after the other (TNLLM_PDL=0) instead of with programmatic "
                         "dependent launch, where each starts loading its weights while the one before finishes")
    ap.add_argument("--profile", action="store_true",
                    help="only profile our CUDA-graph decode step (kernels per token) at each --batches size")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="where decode.md/json go (default $OUT)")
    args = ap.parse_args()
    s = dict(SMOKE if args.smoke else FULL)
    for key in ("prompts", "batches"):
        if getattr(args, key):
            try:
                s[key] = tuple(int(v) for v in getattr(args, key).split(","))
            except ValueError:
                sys.exit(f"--{key} takes comma-separated integers, got {getattr(args, key)!r}")
    if args.no_fused_linears or args.no_fused_step:
        # the model asks these functions whether its fused kernels take a call; answering no keeps every step on
        # the composition it had before those kernels existed (the fused block builds on the fused step)
        import tnllm_plugin.model
        tnllm_plugin.model.decode_linear_applies = lambda *a, **k: False
        if args.no_fused_step:
            tnllm_plugin.model.gla_decode_step_applies = lambda *a, **k: False
    if args.no_pdl:
        os.environ["TNLLM_PDL"] = "0"       # read at each launch (tnllm_kernels.gla_decode.triton_step.pdl_launch)
    if args.fake_oom is None:
        args.fake_oom = s["fake_oom"]
    if args.smoke:
        # the CPU dev venv's torchaudio does not match its torch; transformers imports it when installed
        sys.modules.setdefault("torchaudio", None)
        torch.set_num_threads(1)        # tiny tensors: threads only add waiting on a shared machine
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke on CPU")
    names = [n for n in args.models.split(",") if n]
    if any(n not in (OURS, LLAMA) for n in names):
        sys.exit(f"unknown models in {names}; known: {OURS}, {LLAMA}")
    device, dtype = torch.device("cpu" if args.smoke else "cuda"), torch.bfloat16
    deadline = time.perf_counter() + (args.budget_s if args.budget_s is not None else s["budget_s"])
    torch.manual_seed(0)
    if args.profile:
        text = "\n\n".join(profile_graph_decoder(s, device, dtype, b) for b in s["batches"])
        print(text, flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "decode_profile.md"), "w") as fh:
                fh.write(text + "\n")
        return
    meta = dict(header=header(device, args), dtype=str(dtype), settings=dict(s), args=vars(args))
    print(meta["header"], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = {}

    def emit(name, res):
        results[name] = res
        write_outputs(results, s, meta, args.out)

    for name in names:
        results[name] = run_model(name, s, device, dtype, args, deadline, emit)
    print("\n" + write_outputs(results, s, meta, args.out), flush=True)


if __name__ == "__main__":
    main()
