"""One forward+backward of the lightning-attention kernels per sequence length, after warm-up (autotuning), between
cudaProfilerStart and cudaProfilerStop: what Nsight Compute profiles with --profile-from-start off. bf16, 16 heads
of 128, 32768 tokens per batch (B = 32768 / N), as in benchmarks/lightning_attention.py. The sixteenth session's
walk profile (benchmarks/logs/lightning_walks_ncu_h200_s16.txt) came from

    ncu --profile-from-start off --clock-control none --import-source yes --set full \\
        -k regex:'_walk_kernel|_seg_' -o walks python3 benchmarks/lightning_ncu.py --ns 4096,32768
    ncu -i walks.ncu-rep --page source --csv --print-source sass > source.csv     # stall samples per instruction
"""
import argparse

import torch

from compare_lightning_kernels import H, TOKENS, current, inputs, load     # its inputs and its way to load a version
from tnllm_plugin.model import alibi_slopes


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="4096", help="sequence lengths, comma-separated")
    ap.add_argument("--kernel", default=None, help="another version of triton_chunk.py to profile instead")
    args = ap.parse_args()
    mod = load(args.kernel, 0) if args.kernel else current
    slopes = torch.tensor(alibi_slopes(H), device="cuda")
    for N in map(int, args.ns.split(",")):
        B = TOKENS // N
        q, k, v, do = inputs(B, N, N)
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
