"""One forward+backward of the lightning-attention kernels per sequence length, after warm-up (autotuning), between
cudaProfilerStart and cudaProfilerStop: what Nsight Compute profiles with --profile-from-start off. bf16, 16 heads
of 128, 32768 tokens per batch (B = 32768 / N), as in benchmarks/lightning_attention.py. The sixteenth session's
walk profile (benchmarks/logs/lightning_walks_ncu_h200_s16.txt) came from

    ncu --profile-from-start off --clock-control none --import-source yes --set full \\
        -k regex:'_walk_kernel|_seg_' -o walks python3 benchmarks/lightning_ncu.py --ns 4096,32768
    ncu -i walks.ncu-rep --page source --csv --print-source sass > source.csv     # stall samples per instruction
"""
import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tnllm_plugin.model import alibi_slopes  # noqa: E402

H, D, TOKENS = 16, 128, 32768


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="4096", help="sequence lengths, comma-separated")
    ap.add_argument("--kernel", default=None, help="another version of triton_chunk.py to profile instead")
    args = ap.parse_args()
    if args.kernel:
        spec = importlib.util.spec_from_file_location("tnllm_kernels.lightning_attention._other", args.kernel)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        from tnllm_kernels.lightning_attention import triton_chunk as mod
    slopes = torch.tensor(alibi_slopes(H), device="cuda")
    for N in map(int, args.ns.split(",")):
        B = TOKENS // N
        g = torch.Generator(device="cuda").manual_seed(N)
        q, k = (torch.nn.functional.silu(torch.randn(B, N, H, D, device="cuda", generator=g)).bfloat16()
                for _ in range(2))
        v, do = (torch.randn(B, N, H, D, device="cuda", generator=g).bfloat16() for _ in range(2))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]

        def step():
            o, _ = mod.lightning_attention_triton(*leaves, slopes, output_final_state=False)
            torch.autograd.grad(o, leaves, do)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        print(f"profiled N={N}, B={B}", flush=True)


if __name__ == "__main__":
    main()
