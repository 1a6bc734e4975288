"""A/B in one process: the GEMV's norm loop reading BLOCK_K a load (before) against NORM_K (after), each in a freshly
captured graph decoder, alternated; device and wall ms per token as decode_tiles_in_step.measure times them.

Ran (session 13, call 2) against a working-tree variant of kernels/decode_linear/triton_gemv.py with a NORM_K
constexpr and its rule _norm_k (not committed; main reads BLOCK_K a load). Kept as the record of the A/B, not a tool.
"""
import json, os, statistics, sys
import torch
sys.path.insert(0, "benchmarks")
import decode as D
import decode_tiles_in_step as S
from tnllm_kernels.decode_linear import triton_gemv
rule = triton_gemv._norm_k
variants = {"before": lambda k, bk: bk, "after": rule}
device = torch.device("cuda")
torch.manual_seed(0)
runner = D.Ours(D.FULL, device, torch.bfloat16)
graph, _ = D.graph_decoder(device)
out = {}
for batch in [int(b) for b in sys.argv[1].split(",")]:
    with torch.no_grad():
        state, logits = runner.prefill(D.make_prompt(D.FULL, batch, 1024, device))
    tok = logits.argmax(-1)
    res = {k: [] for k in variants}
    for r in range(4):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for name in order:
            triton_gemv._norm_k = variants[name]
            dev, wall = S.measure(runner, graph, state, tok)
            res[name].append((dev, wall))
            print(f"batch {batch} round {r + 1} {name}: device {dev:.4f} wall {wall:.4f}", flush=True)
    out[batch] = res
    for name, v in res.items():
        print(f"batch {batch} {name}: device median {statistics.median(d for d, _ in v):.4f} "
              f"wall median {statistics.median(w for _, w in v):.4f}", flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ab_norm.json"), "w"), indent=1)
