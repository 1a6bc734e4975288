"""Another version of the lightning-attention Triton kernels against the current one, in one GPU process:
forward and forward+backward time (bf16, H=16, D=128, 32768 tokens; three interleaved rounds, median) and the
error of each against float64 (the chunked PyTorch reference). For checking a kernel change before it lands:

    git show HEAD~1:kernels/lightning_attention/triton_chunk.py > /tmp/old_triton_chunk.py
    python benchmarks/compare_lightning_kernels.py /tmp/old_triton_chunk.py
"""
import argparse
import importlib.util
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tnllm_kernels.lightning_attention import triton_chunk as current  # noqa: E402
from tnllm_kernels.lightning_attention.chunk import lightning_attention_chunk  # noqa: E402

H, D, TOKENS = 16, 128, 32768


def load(path):
    spec = importlib.util.spec_from_file_location("other_triton_chunk", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(B, N, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.nn.functional.silu(torch.randn(B, N, H, D, device="cuda", generator=g)).bfloat16() for _ in range(2))
    v, do = (torch.randn(B, N, H, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    return q, k, v, do


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("other", help="path of the other version's triton_chunk.py")
    kernels = {"other": load(ap.parse_args().other), "current": current}
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("\n| N | B | other fwd+bwd ms | current fwd+bwd ms | current/other | other fwd ms | current fwd ms | current/other |")
    print("|---|---|---|---|---|---|---|---|")
    for N in (1024, 2048, 4096, 8192, 16384, 32768):
        B = TOKENS // N
        q, k, v, do = inputs(B, N, N)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        times = {name: ([], []) for name in kernels}
        for _ in range(3):      # interleaved rounds: clock and neighbour drift hit both versions alike
            for name, mod in kernels.items():
                def fwd_bwd():
                    o, _ = mod.lightning_attention_triton(*leaves, slopes, output_final_state=False)
                    torch.autograd.grad(o, leaves, do)

                def fwd():
                    with torch.no_grad():
                        mod.lightning_attention_triton(q, k, v, slopes, output_final_state=False)
                times[name][0].append(triton.testing.do_bench(fwd_bwd, warmup=50, rep=200))
                times[name][1].append(triton.testing.do_bench(fwd, warmup=50, rep=200))
        med = {name: [sorted(t)[1] for t in ts] for name, ts in times.items()}
        o, c = med["other"], med["current"]
        print(f"| {N} | {B} | {o[0]:.3f} | {c[0]:.3f} | {c[0] / o[0]:.3f} | {o[1]:.3f} | {c[1]:.3f} | {c[1] / o[1]:.3f} |",
              flush=True)

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
