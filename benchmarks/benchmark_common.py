"""What the GPU benchmarks share: the same-size models they compare, built from one settings dict (keys vocab,
layers, dim, heads, ffn), and the device bookkeeping around a measurement."""
import gc
import json
import math
import os

import torch

from tnllm_plugin.model import TransNormerLLM
from tnllm_plugin.presets import preset_config


def transnormer_model(s, full: bool) -> TransNormerLLM:
    """transnormer_llm_385m (full) or a tiny model of the smoke sizes."""
    cfg = preset_config("385m", vocab_size=s["vocab"]) if full else preset_config(
        "tiny", vocab_size=s["vocab"], n_layers=s["layers"], d_model=s["dim"], hidden_dim=s["dim"],
        n_heads=s["heads"], glu_dim=s["ffn"])
    return TransNormerLLM(cfg)


def llama_model(s, max_positions: int):
    """Hugging Face LlamaForCausalLM of the same sizes, SDPA attention, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["ffn"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=max_positions, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def profiled_kernels(averages, cuda: bool):
    """(name, calls, self microseconds) of what a torch.profiler run spent its time in, from its key_averages():
    on CUDA the kernels (device time, each counted once); on the CPU the aten operators' own time (they nest: self
    time counts each microsecond once)."""
    if cuda:
        return [(e.key, e.count, e.self_device_time_total) for e in averages
                if e.device_type == torch.autograd.DeviceType.CUDA]
    return [(e.key, e.count, e.self_cpu_time_total) for e in averages if e.key.startswith("aten::")]


def graph_us(fn, rep_ms: int) -> float:
    """Median microseconds of fn() replayed in a CUDA graph (triton.testing.do_bench_cudagraph), after one call
    outside it (Triton compiles there, not during capture)."""
    from triton.testing import do_bench_cudagraph
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3


def cycled_us(fn, copies, rep_ms: int) -> float:
    """Median microseconds per call of fn(c) for each operand set c of ``copies`` in turn, replayed in a CUDA graph
    (graph_us over the whole cycle): with copies_past_l2 of them, each call finds its operands in HBM."""
    return graph_us(lambda: [fn(c) for c in copies], rep_ms) / len(copies)


def copies_past_l2(nbytes: int, times: int = 4) -> int:
    """How many copies of ``nbytes`` of operands a timing cycles through so that each call reads them from HBM, as a
    decode step does (24 layers' weights and states, ~0.9 GB at 16 rows, stream past the 50 MB L2 of an H200): enough
    to fill the L2 ``times`` over. A kernel repeated on one copy finds it in L2 and times faster than in a decode."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(1, math.ceil(times * l2 / nbytes))


def report_sweep(name: str, lines, results) -> None:
    """A tile sweep's report: its lines printed, and written to $OUT/name.md (with the results in $OUT/name.json)
    when OUT is set."""
    text = "\n".join(lines)
    print("\n" + text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name + ".md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(results, f, indent=1)
