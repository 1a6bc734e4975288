"""Lightning attention and SRMSNorm benchmark (issue 3). One run on one GPU, bf16, H = 16 heads of dim 128,
32768 tokens per batch (B = 32768 / N):

* correctness at a benchmark shape: ours, fla ``chunk_simple_gla`` (g form and g_gamma form) against a float64
  reference (relative error of o, final state and every input gradient); the paper authors' Lightning Attention-2
  (PyPI ``lightning-attn``, ``lightning_attn2``: no initial or final state) and ours again without states, against
  a float64 reference without states;
* forward+backward and forward-only median time (triton.testing.do_bench) and peak memory of: ours; the PyTorch
  naive left product (the paper's baseline; out of memory is reported as such); fla 0.6.0 ``chunk_simple_gla``
  with the same per-head decay (g = -slope per token, the form the issue names; and g_gamma = -slope, fla's
  constant-decay form); the paper authors' ``lightning_attn2`` (lightning-attn 0.0.5, the same decay as a [H, 1, 1]
  slope tensor); softmax causal attention through torch SDPA;
* the memory floor of each shape (q, k, v read and o written once for the forward; q, k, v, do read and o, dq, dk,
  dv written once for forward+backward, at --hbm-tbs TB/s) and each method's forward+backward time replayed from
  a CUDA graph as a multiple of it;
* SRMSNorm (and the fused norm * gate) forward+backward at d = 4096 against eager PyTorch.

Prints markdown tables (and writes them to --out). Needs CUDA; fla and lightning-attn are optional (their
columns are left out without them).

    python benchmarks/lightning_attention.py [--ns 1024,2048,...] [--variants] [--out FILE]
"""
import argparse
import datetime
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def _import_kernels():
    try:
        import tnllm_kernels  # noqa: F401
    except ImportError:                     # running from a checkout: make kernels/ importable as tnllm_kernels
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "tnllm_kernels", os.path.join(HERE, "..", "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(HERE, "..", "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["tnllm_kernels"] = mod
        spec.loader.exec_module(mod)


_import_kernels()
from tnllm_kernels.lightning_attention.chunk import lightning_attention_chunk  # noqa: E402
from tnllm_kernels.lightning_attention.naive import lightning_attention_naive  # noqa: E402
from tnllm_kernels.lightning_attention.triton_chunk import lightning_attention_triton, _num_sms, _plan  # noqa: E402
from tnllm_kernels.srmsnorm.reference import srms_norm_reference  # noqa: E402
from tnllm_kernels.srmsnorm.triton_srmsnorm import srms_norm_gate_triton, srms_norm_triton  # noqa: E402

try:
    from fla.ops.simple_gla import chunk_simple_gla
    import fla
    FLA_VERSION = getattr(fla, "__version__", "?")
    # fla 0.6.0 refuses the backward of the per-token gate form g on Hopper with Triton 3.4 to 3.7.0 (its issue
    # #640: wrong dq/dk/dg from a Triton miscompile). For TIMING that form anyway, the guard is lifted here; its
    # accuracy is reported as measured. The constant-decay form g_gamma is not guarded and is timed as well.
    import fla.ops.common.chunk_o as _fla_chunk_o
    FLA_G_GUARDED = (getattr(_fla_chunk_o, "IS_NVIDIA_HOPPER", False) and getattr(_fla_chunk_o, "TRITON_ABOVE_3_4_0", False)
                     and not getattr(_fla_chunk_o, "TRITON_ABOVE_3_7_1", True))
    if FLA_G_GUARDED:
        _fla_chunk_o.TRITON_ABOVE_3_7_1 = True
except Exception as e:  # noqa: BLE001
    chunk_simple_gla = None
    FLA_G_GUARDED = False
    FLA_VERSION = f"not importable ({type(e).__name__}: {e})"

try:
    from lightning_attn.ops import lightning_attn2
    import importlib.metadata
    LIGHTNING_VERSION = importlib.metadata.version("lightning-attn")
except Exception as e:  # noqa: BLE001
    lightning_attn2 = None
    LIGHTNING_VERSION = f"not importable ({type(e).__name__}: {e})"

OOM = "OOM"
LIGHTNING = "lightning_attn2 (paper authors)"
FLA_G = "fla simple_gla g" + (" (guard lifted)" if FLA_G_GUARDED else "")
FLA_GG = "fla simple_gla g_gamma"


T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.0f} s]", *a, flush=True)


def bench(fn, grad_to_none=None):
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="median")


def bench_graph(fn):
    """fn's median time replayed from a CUDA graph: the device's time without the host's launch overhead (each of
    our kernels costs the host tens of microseconds to launch from Python; at a few kernels a layer the host, not the
    GPU, can set do_bench's time). "n/a" where fn cannot be captured."""
    from triton.testing import do_bench_cudagraph
    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:  # noqa: BLE001  (a method that does not capture: its row says so)
        log(f"  CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}")
        return "n/a"


def peak_gib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def alibi_slopes(H):
    return torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float32)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------------- methods
def make_methods(B, N, H, D, slope, variants, only=None):
    """name -> (layout, fwd(q, k, v) -> o). layout 'bnhd' or 'bhnd' (SDPA, lightning_attn2). ``only``: the names
    to keep (None: all)."""
    dev = slope.device
    g = (-slope)[None, None, :].expand(B, N, H).contiguous()
    g_gamma = (-slope).contiguous()
    m = {"ours": ("bnhd", lambda q, k, v: lightning_attention_triton(q, k, v, slope, None, output_final_state=False)[0])}
    for name, kw in variants:
        m[name] = ("bnhd", lambda q, k, v, kw=kw: lightning_attention_triton(q, k, v, slope, None,
                                                                            output_final_state=False, **kw)[0])
    m["naive (paper)"] = ("bnhd", lambda q, k, v: lightning_attention_naive(q, k, v, slope)[0])
    if chunk_simple_gla is not None:
        m[FLA_G] = ("bnhd", lambda q, k, v: chunk_simple_gla(q, k, v, g=g, scale=1.0)[0])
        m[FLA_GG] = ("bnhd", lambda q, k, v: chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0)[0])
    if lightning_attn2 is not None:
        s = slope.reshape(H, 1, 1).contiguous()
        m[LIGHTNING] = ("bhnd", lambda q, k, v: lightning_attn2(q, k, v, s))
    m["SDPA softmax"] = ("bhnd", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return m if only is None else {name: m[name] for name in m if name in only}


METHOD_NAMES = {"ours": "ours", "naive": "naive (paper)", "fla_g": FLA_G, "fla_g_gamma": FLA_GG,
                "lightning_attn2": LIGHTNING, "sdpa": "SDPA softmax"}


def run_table(ns, H, D, tokens, variants, dtype=torch.bfloat16, only=None):
    rows = []
    dev = "cuda"
    slope = alibi_slopes(H).to(dev)
    for N in ns:
        B = max(1, tokens // N)
        var = []
        for name, kw in variants:
            if kw == "auto2":
                P = _plan(B, N, H, D, D, 64, _num_sms(torch.device(dev)))
                kw = dict(num_segments=min(P["NC"], 2 * P["NSEG"]))
            var.append((name, kw))
        methods = make_methods(B, N, H, D, slope, var, None if only is None else only | {n for n, _ in var})
        for name, (layout, fwd) in methods.items():
            torch.cuda.empty_cache()
            shape = (B, N, H, D) if layout == "bnhd" else (B, H, N, D)
            res = {"N": N, "B": B, "method": name}
            try:
                gen = torch.Generator(device=dev).manual_seed(N)
                q = F.silu(torch.randn(shape, device=dev, generator=gen)).to(dtype).requires_grad_()
                k = F.silu(torch.randn(shape, device=dev, generator=gen)).to(dtype).requires_grad_()
                v = torch.randn(shape, device=dev, generator=gen).to(dtype).requires_grad_()
                do = torch.randn(shape, device=dev, generator=gen).to(dtype)

                def fb():
                    fwd(q, k, v).backward(do)

                def fb_grads():
                    # fb's work for a CUDA graph, whose replays would add up every .grad (three more kernels a
                    # replay: they were in this column's first run); do_bench resets .grad between calls instead
                    torch.autograd.grad(fwd(q, k, v), (q, k, v), do)

                def f_only():
                    with torch.no_grad():
                        fwd(q, k, v)
                fb()                                       # compile / autotune outside the measurements
                q.grad = k.grad = v.grad = None
                res["fb_mem"] = peak_gib(fb)
                q.grad = k.grad = v.grad = None
                res["fb_ms"] = bench(fb, grad_to_none=[q, k, v])
                q.grad = k.grad = v.grad = None
                res["fb_graph_ms"] = bench_graph(fb_grads)
                q.grad = k.grad = v.grad = None
                f_only()
                res["f_mem"] = peak_gib(f_only)
                res["f_ms"] = bench(f_only)
            except Exception as e:  # noqa: BLE001  (torch.cuda.OutOfMemoryError is a RuntimeError)
                tag = OOM if "out of memory" in str(e).lower() else "error"
                if tag != OOM:
                    log(f"  {name} N={N}: {type(e).__name__}: {str(e)[:300]}")
                for key in ("fb_mem", "fb_ms", "fb_graph_ms", "f_mem", "f_ms"):
                    res.setdefault(key, tag)
            finally:
                q = k = v = do = None
                torch.cuda.empty_cache()
            rows.append(res)
            log(f"  N={N:6d} B={B:3d} {name:24s} fwd+bwd {fmt(res['fb_ms'])} ms  (CUDA graph {fmt(res['fb_graph_ms'])})  "
                f"fwd {fmt(res['f_ms'])} ms  "
                f"peak fwd+bwd {fmt(res['fb_mem'])} GiB")
    return rows


def fmt(x, nd=3):
    return x if isinstance(x, str) else f"{x:.{nd}f}"


def markdown(rows, key, unit, title):
    ns = sorted({r["N"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["N"], r["method"]): r for r in rows}
    out = [f"**{title}**", "", "| N | B | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for N in ns:
        B = by[(N, names[0])]["B"]
        cells = []
        for nm in names:
            r = by.get((N, nm))
            cells.append("-" if r is None else (fmt(r[key], 2 if unit == "GiB" else 3) +
                                                ("" if isinstance(r[key], str) else f" {unit}")))
        out.append(f"| {N} | {B} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- accuracy
def accuracy(B=2, N=4096, H=16, D=128, dtype=torch.bfloat16, with_s0=True, only=None):
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    slope = alibi_slopes(H).to(dev)
    slope[0] = 0.0                                            # one head without decay (lambda = 1)
    q = F.silu(torch.randn(B, N, H, D, device=dev, generator=gen)).to(dtype)
    k = F.silu(torch.randn(B, N, H, D, device=dev, generator=gen)).to(dtype)
    v = torch.randn(B, N, H, D, device=dev, generator=gen).to(dtype)
    s0 = torch.randn(B, H, D, D, device=dev, generator=gen) if with_s0 else None
    do = torch.randn(B, N, H, D, device=dev, generator=gen)
    dht = torch.randn(B, H, D, D, device=dev, generator=gen) * 0.01

    def run(fn, cast):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        s0r = cast(s0).detach().requires_grad_() if s0 is not None else None
        o, fin = fn(leaves, s0r)
        ((o.double() * do.double()).sum() + (fin.double() * dht.double()).sum()).backward()
        return [o, fin] + [t.grad for t in leaves] + [s0r.grad if s0r is not None else None]

    ref = run(lambda l, s: lightning_attention_chunk(*l, slope.double(), s), lambda t: t.double())
    results = {"ours": run(lambda l, s: lightning_attention_triton(*l, slope, s), lambda t: t)}
    keep = (lambda name: True) if only is None else (lambda name: name in only)
    if chunk_simple_gla is not None and keep(FLA_G):
        g = (-slope)[None, None, :].expand(B, N, H).contiguous()
        results[FLA_G] = run(lambda l, s: chunk_simple_gla(*l, g=g, scale=1.0, initial_state=s,
                                                             output_final_state=True), lambda t: t)
    if chunk_simple_gla is not None and keep(FLA_GG):
        results[FLA_GG] = run(lambda l, s: chunk_simple_gla(*l, g_gamma=-slope, scale=1.0, initial_state=s,
                                                                   output_final_state=True), lambda t: t)
    names = ["o", "final state", "dq", "dk", "dv", "d initial state"]
    # without states (what lightning_attn2 computes): o and the input gradients against a stateless reference
    ref0 = run0(lambda l: lightning_attention_chunk(*l, slope.double(), None)[0], lambda t: t.double(), q, k, v, do)
    stateless = {"ours": run0(lambda l: lightning_attention_triton(*l, slope, None, output_final_state=False)[0],
                              lambda t: t, q, k, v, do)}
    if lightning_attn2 is not None and keep(LIGHTNING):
        s = slope.reshape(H, 1, 1).contiguous()
        stateless[LIGHTNING] = run0(lambda l: lightning_attn2(*l, s).transpose(1, 2),
                                    lambda t: t.transpose(1, 2).contiguous(), q, k, v, do)
    lines = [f"**Accuracy**: B={B}, N={N}, H={H}, D={D}, {str(dtype).replace('torch.', '')} inputs, ALiBi slopes with "
             f"head 0 at slope 0, initial state given; relative error ||x - ref|| / ||ref|| against a float64 "
             f"reference (PyTorch block form on float64 copies of the same inputs)", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for nm, res in results.items():
        cells = [("-" if (a is None or b is None) else f"{rel(a, b):.2e}") for a, b in zip(res, ref)]
        lines.append(f"| {nm} | " + " | ".join(cells) + " |")
    for nm, res in stateless.items():      # no states: o, dq, dk, dv only
        cells = [f"{rel(a, b):.2e}" for a, b in zip(res, ref0)]
        lines.append(f"| {nm}, no states | {cells[0]} | - | " + " | ".join(cells[1:]) + " | - |")
    return "\n".join(lines)


def run0(fn, cast, q, k, v, do):
    """o and dq, dk, dv of fn(leaves) (no states) in [B, N, H, D], the loss sum(o * do) in float64. ``cast`` maps
    a [B, N, H, D] input to what fn takes."""
    leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
    o = fn(leaves)
    (o.double() * do.double()).sum().backward()
    back = (lambda t: t.transpose(1, 2)) if leaves[0].shape != q.shape else (lambda t: t)
    return [o] + [back(t.grad) for t in leaves]


# ------------------------------------------------------------------------------------------------- floor
def floor_lines(rows, H, D, tbs):
    """Each shape's memory floor (bf16 tensors of B*N*H*D moved once) and every method's time over it: its time
    replayed from a CUDA graph, the device's time a training step sees (timed call to call, marked *, where there is
    no graphed time: the capture failed or was not run)."""
    ns = sorted({r["N"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["N"], r["method"]): r for r in rows}
    out = [f"**Over the memory floor** (fwd+bwd: q, k, v, do read and o, dq, dk, dv written once, 8 tensors; "
           f"fwd: 4 tensors; bf16 at {tbs} TB/s): floor ms, then each method's fwd+bwd time replayed from a CUDA "
           f"graph / floor (* timed call to call: no graphed time)", "",
           "| N | B | floor fwd+bwd ms | floor fwd ms | " + " | ".join(names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for N in ns:
        B = by[(N, names[0])]["B"]
        tensor_bytes = B * N * H * D * 2
        floor_fb, floor_f = 8 * tensor_bytes / (tbs * 1e9), 4 * tensor_bytes / (tbs * 1e9)     # ms
        cells = []
        for nm in names:
            row = by.get((N, nm), {})
            graphed, eager = row.get("fb_graph_ms"), row.get("fb_ms")
            if isinstance(graphed, float):
                cells.append(f"{graphed / floor_fb:.1f}x")
            elif isinstance(eager, float):
                cells.append(f"{eager / floor_fb:.1f}x*")
            else:
                cells.append(eager or "-")
        out.append(f"| {N} | {B} | {floor_fb:.3f} | {floor_f:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- SRMSNorm
def srms_table(rows=32768, d=4096, dtype=torch.bfloat16):
    dev = "cuda"
    x = torch.randn(rows, d, device=dev).to(dtype).requires_grad_()
    u = torch.randn(rows, d, device=dev).to(dtype).requires_grad_()
    dz = torch.randn(rows, d, device=dev).to(dtype)
    cases = [
        ("srms_norm", lambda: srms_norm_reference(x), lambda: srms_norm_triton(x)),
        ("srms_norm(x) * u", lambda: srms_norm_reference(x) * u, lambda: srms_norm_gate_triton(x, u)),
    ]
    lines = [f"**SRMSNorm**, {rows} rows x d={d}, {str(dtype).replace('torch.', '')}, median ms", "",
             "| op | eager fwd | Triton fwd | speedup | eager fwd+bwd | Triton fwd+bwd | speedup | rel. err (out, dx) vs fp64 |",
             "|---|---|---|---|---|---|---|---|"]
    xd = x.detach().double().requires_grad_()
    ud = u.detach().double().requires_grad_()
    for name, eager, ours in cases:
        def fb(f):
            return lambda: f().backward(dz)

        def fo(f):
            def g():
                with torch.no_grad():
                    f()
            return g
        t = {}
        for tag, f in (("eager", eager), ("ours", ours)):
            fb(f)()
            t[tag + "_fb"] = bench(fb(f), grad_to_none=[x, u])
            t[tag + "_f"] = bench(fo(f))
        x.grad = u.grad = None
        z = ours()
        z.backward(dz)
        xd.grad = ud.grad = None
        zd = srms_norm_reference(xd) * (ud if "u" in name else 1)
        zd.backward(dz.double())
        err = f"{rel(z, zd):.1e}, {rel(x.grad, xd.grad):.1e}"
        x.grad = u.grad = None
        lines.append(f"| {name} | {t['eager_f']:.3f} | {t['ours_f']:.3f} | {t['eager_f'] / t['ours_f']:.2f}x | "
                     f"{t['eager_fb']:.3f} | {t['ours_fb']:.3f} | {t['eager_fb'] / t['ours_fb']:.2f}x | {err} |")
    return "\n".join(lines)


def device_info():
    p = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001
        smi = "nvidia-smi n/a"
    import triton
    return (f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2 ** 30:.0f} GiB (nvidia-smi: {smi}); "
            f"torch {torch.__version__}, triton {triton.__version__}, fla {FLA_VERSION}, lightning-attn "
            f"{LIGHTNING_VERSION}; "
            f"date {datetime.date.today().isoformat()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--hbm-tbs", type=float, default=4.3,
                    help="memory bandwidth of the floor, TB/s (4.3: what an H200 reaches of its 4.8 peak)")
    ap.add_argument("--variants", action="store_true", help="also time our kernel with other chunk/segment knobs")
    ap.add_argument("--methods", default=None,
                    help="comma list of the methods to run (default all): " + ",".join(METHOD_NAMES))
    ap.add_argument("--skip", default="", help="comma list of parts to skip: accuracy,attention,srms")
    ap.add_argument("--out", default=None, help="write the markdown here too")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    only = None
    if args.methods is not None:
        picked = [m for m in args.methods.split(",") if m]
        unknown = [m for m in picked if m not in METHOD_NAMES]
        if unknown:
            sys.exit(f"--methods: unknown {unknown}; known: {','.join(METHOD_NAMES)}")
        if "ours" not in picked:
            sys.exit("--methods: 'ours' must be among them (every table sets the others against it)")
        only = {METHOD_NAMES[m] for m in picked}
    if not torch.cuda.is_available():
        sys.exit("benchmarks/lightning_attention.py needs a CUDA GPU")
    parts = [f"Device: {device_info()}", f"Command: python {' '.join(sys.argv)}"]

    def save():     # after each part: a run cut short keeps what it measured
        if args.out:
            with open(args.out, "w") as fh:
                fh.write("\n\n".join(parts) + "\n")
    log(parts[0])
    t0 = time.time()
    if "attention" not in skip:
        variants = []
        if args.variants:
            variants = [("ours 2x segments", "auto2")]
        ns = [int(n) for n in args.ns.split(",")]
        rows = run_table(ns, args.heads, args.dim, args.tokens, variants, only=only)
        shape = f"bf16, H={args.heads}, D={args.dim}, {args.tokens} tokens per batch (B = {args.tokens}/N)"
        parts.append(markdown(rows, "fb_ms", "ms", f"Forward+backward, median ms, {shape}"))
        parts.append(markdown(rows, "fb_graph_ms", "ms", f"Forward+backward replayed from a CUDA graph (no host "
                                                       f"launch overhead), median ms, {shape}"))
        parts.append(markdown(rows, "f_ms", "ms", f"Forward only, median ms, {shape}"))
        parts.append(markdown(rows, "fb_mem", "GiB", "Peak memory during forward+backward, GiB (inputs q, k, v, do included)"))
        parts.append(markdown(rows, "f_mem", "GiB", "Peak memory during forward only, GiB (inputs included)"))
        parts.append(floor_lines(rows, args.heads, args.dim, args.hbm_tbs))
        # acceptance check against both fla forms
        if chunk_simple_gla is not None:
            by = {(r["N"], r["method"]): r for r in rows}
            verdict = []
            for N in ns:
                o = by[(N, "ours")]
                for nm in (FLA_G, FLA_GG):
                    if (N, nm) not in by:
                        continue
                    f = by[(N, nm)]
                    ok_t = isinstance(o["fb_ms"], float) and (isinstance(f["fb_ms"], str) or o["fb_ms"] <= f["fb_ms"])
                    ok_m = isinstance(o["fb_mem"], float) and (isinstance(f["fb_mem"], str) or o["fb_mem"] <= f["fb_mem"])
                    both = isinstance(o["fb_ms"], float) and isinstance(f["fb_ms"], float)
                    ratio = f"{f['fb_ms'] / o['fb_ms']:.2f}x" if both else "-"
                    verdict.append(f"N={N} vs {nm}: time {'OK' if ok_t else 'SLOWER'} ({fmt(o['fb_ms'])} vs "
                                   f"{fmt(f['fb_ms'])} ms, fla/ours {ratio}), "
                                   f"memory {'OK' if ok_m else 'HIGHER'} ({fmt(o['fb_mem'], 2)} vs {fmt(f['fb_mem'], 2)} GiB)")
            parts.append("Ours vs fla chunk_simple_gla, fwd+bwd:\n" + "\n".join("- " + v for v in verdict))
        save()
    if "accuracy" not in skip:
        try:
            acc = accuracy(only=only)
        except Exception:  # noqa: BLE001  (report and go on)
            import traceback
            acc = "accuracy check failed:\n" + traceback.format_exc()
        log(acc)
        parts.append(acc)    # after the timings: fla autotunes its own shapes first
        save()
    if "srms" not in skip:
        s = srms_table()
        log(s)
        parts.append(s)
    parts.append(f"(benchmark wall time {time.time() - t0:.0f} s)")
    text = "\n\n".join(parts)
    print("\n\n" + text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
