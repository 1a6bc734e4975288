"""Other versions of the lightning-attention Triton kernels against the current one, in one GPU process:
forward and forward+backward time (bf16, H=16, D=128, 32768 tokens; three interleaved rounds, median), the time of
each kernel launched in forward+backward (torch.profiler, --profile), and the error of each version against float64
(the chunked PyTorch reference). For checking a kernel change before it lands:

    git show HEAD~1:kernels/lightning_attention/triton_chunk.py > /tmp/old_triton_chunk.py
    python benchmarks/compare_lightning_kernels.py /tmp/old_triton_chunk.py [more versions ...] [--profile]
"""
import argparse
import collections
import importlib.util
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tnllm_kernels.lightning_attention import triton_chunk as current  # noqa: E402
from tnllm_kernels.lightning_attention.chunk import lightning_attention_chunk  # noqa: E402
from tnllm_plugin.model import alibi_slopes  # noqa: E402
from tnllm_plugin.cuda_graph_step import warmup_stream  # noqa: E402
from benchmark_common import graph_us  # noqa: E402

H, D, TOKENS = 16, 128, 32768
NS = (1024, 2048, 4096, 8192, 16384, 32768)


def load(path, index):
    # named inside the kernel's package, so that a version's relative imports (from .._interpreter ...) resolve
    spec = importlib.util.spec_from_file_location(f"tnllm_kernels.lightning_attention._other_{index}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(B, N, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.nn.functional.silu(torch.randn(B, N, H, D, device="cuda", generator=g)).bfloat16() for _ in range(2))
    v, do = (torch.randn(B, N, H, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    return q, k, v, do


def kernel_times(fn, iters=20):
    """Device time per call of fn, per kernel name (us), from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] += e.device_time_total / iters if hasattr(e, "device_time_total") else e.cuda_time_total / iters
    return per


def replay_timeline(intervals, replays):
    """From the (start, end) of every kernel run during ``replays`` replays of one graph (the profiler's records):
    (kernels per replay, busy us per replay, span us per replay). Busy: the time at least one kernel ran; span: from
    a replay's first kernel start to its last kernel end. Span minus busy is the time the GPU sat between kernels
    of one forward+backward: launch gaps, and tails where one kernel waits for the one before to finish."""
    intervals = sorted(intervals)
    if not intervals or len(intervals) % replays:
        raise ValueError(f"{len(intervals)} kernel records do not divide into {replays} replays")
    per = len(intervals) // replays
    busy = span = 0.0
    for r in range(replays):
        group = intervals[r * per:(r + 1) * per]
        span += max(end for _, end in group) - group[0][0]
        covered_to = group[0][0]
        for start, end in group:
            busy += max(0.0, end - max(start, covered_to))
            covered_to = max(covered_to, end)
    return per, busy / replays, span / replays


def graph_timeline(fn, replays=20):
    """replay_timeline of fn captured in a CUDA graph and replayed under the profiler."""
    side = warmup_stream(torch.device("cuda", torch.cuda.current_device()))
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
               and "memset" not in e.name.lower()]
    return replay_timeline(kernels, replays)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("others", nargs="+", help="paths of other versions' triton_chunk.py (labelled by file name)")
    ap.add_argument("--profile", action="store_true", help="also print each kernel's time in forward+backward")
    ap.add_argument("--ns", default=",".join(map(str, NS)), help="sequence lengths (B = 32768 / N)")
    ap.add_argument("--graph-gaps", action="store_true",
                    help="also replay forward+backward from a CUDA graph under the profiler: kernels' busy time "
                         "against the replay's span (the GPU idle between kernels)")
    ap.add_argument("--graph-replay", action="store_true",
                    help="also time forward+backward replayed from a CUDA graph as lightning_attention.py's table "
                         "does (do_bench_cudagraph: about a second of back-to-back work, so at the clocks the GPU "
                         "holds under sustained load rather than in a short burst)")
    args = ap.parse_args()
    kernels = {os.path.splitext(os.path.basename(p))[0]: load(p, i) for i, p in enumerate(args.others)}
    kernels["current"] = current
    names = list(kernels)
    slopes = torch.tensor(alibi_slopes(H), device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    columns = [f"{n} fwd+bwd ms" for n in names] + [f"{n} fwd ms" for n in names]
    if args.graph_replay:
        columns += [f"{n} fwd+bwd graph ms" for n in names]
    print("\n| N | B | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    profiles, gaps = {}, {}
    for N in map(int, args.ns.split(",")):
        B = TOKENS // N
        q, k, v, do = inputs(B, N, N)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        times = {name: ([], [], []) for name in kernels}
        for _ in range(3):      # interleaved rounds: clock and neighbour drift hit every version alike
            for name, mod in kernels.items():
                def fwd_bwd(mod=mod):
                    o, _ = mod.lightning_attention_triton(*leaves, slopes, output_final_state=False)
                    torch.autograd.grad(o, leaves, do)

                def fwd(mod=mod):
                    with torch.no_grad():
                        mod.lightning_attention_triton(q, k, v, slopes, output_final_state=False)
                times[name][0].append(triton.testing.do_bench(fwd_bwd, warmup=50, rep=200))
                times[name][1].append(triton.testing.do_bench(fwd, warmup=50, rep=200))
                if args.graph_replay:
                    times[name][2].append(graph_us(fwd_bwd, rep_ms=100) / 1e3)
                if args.profile and len(times[name][0]) == 1:
                    profiles[(N, name)] = kernel_times(fwd_bwd)
                if args.graph_gaps and len(times[name][0]) == 1:
                    gaps[(N, name)] = graph_timeline(fwd_bwd)
        med = {name: [sorted(t)[1] for t in ts if t] for name, ts in times.items()}
        cells = [f"{med[n][i]:.3f}" for i in range(len(med[names[0]])) for n in names]
        print(f"| {N} | {B} | " + " | ".join(cells) + " |", flush=True)

    if profiles:
        print("\nautotuned configs (kernel: tuning key -> config)")
        for name, mod in kernels.items():
            for kern in getattr(mod, "_AUTOTUNED", []):
                for key, cfg in getattr(kern, "cache", {}).items():
                    print(f"{name} {kern.fn.__name__}: {key} -> {cfg}")
        print("\nper kernel, us per forward+backward (torch.profiler, 20 calls)")
        for (N, name), per in profiles.items():
            parts = ", ".join(f"{k[:40]} {t:.1f}" for k, t in per.most_common())
            print(f"N={N} {name}: total {sum(per.values()):.1f}: {parts}")

    if gaps:
        print("\nreplayed from a CUDA graph (profiler, 20 replays): kernels, busy us, span us, idle us per forward+backward")
        for (N, name), (count, busy, span) in gaps.items():
            print(f"N={N} {name}: {count} kernels, busy {busy:.1f}, span {span:.1f}, idle {span - busy:.1f}")

    print("\n| N | B | version | rel. error o | dq | dk | dv |")
    print("|---|---|---|---|---|---|---|")
    for N, B in ((4096, 2), (32768, 1)):
        q, k, v, do = inputs(B, N, 7)
        leaves = [t.double().requires_grad_() for t in (q, k, v)]
        o, _ = lightning_attention_chunk(*leaves, slopes.double())
        ref = [o.detach(), *torch.autograd.grad(o, leaves, do.double())]
        for name, mod in kernels.items():
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            o, _ = mod.lightning_attention_triton(*leaves, slopes, output_final_state=False)
            got = [o, *torch.autograd.grad(o, leaves, do)]
            errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
            print(f"| {N} | {B} | {name} | " + " | ".join(f"{e:.2e}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
