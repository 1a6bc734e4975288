"""Ran in the fourteenth session, call 2, the same probe tree with the knobs taking a function of (N, K, SGLU pair); kept as the record of the A/B, not a tool.

One process: the decode GEMVs' per-line L2 prefetch before the PDL wait switched on per layer kind, with and
without a register cap of 128 (maxnreg), at batches 16 and 8: each variant in a freshly captured graph decoder,
alternated four rounds, device and wall ms as decode_tiles_in_step.measure."""
import json, os, statistics, sys
import torch
sys.path.insert(0, "benchmarks")
import decode as D
import decode_tiles_in_step as S
from tnllm_kernels.decode_linear import triton_gemv as G
device = torch.device("cuda")
torch.manual_seed(0)
runner = D.Ours(D.FULL, device, torch.bfloat16)
graph, _ = D.graph_decoder(device)
KINDS = ("qkvu", "out_proj", "sglu", "l3")
def kind(n, k, glu):
    return S.GEMVS.get((n, k, glu))
def setting(on, value):
    return lambda n, k, glu: value if kind(n, k, glu) in on else 0
variants = {"off": (set(), None), "all+reg": (set(KINDS), 128), "off+reg": (set(), 128)}
for kd in KINDS:
    variants[f"only {kd}+reg"] = ({kd}, 128)
    variants[f"all but {kd}+reg"] = (set(KINDS) - {kd}, 128)
out = {}
for batch in [int(b) for b in sys.argv[1].split(",")]:
    with torch.no_grad():
        state, logits = runner.prefill(D.make_prompt(D.FULL, batch, 1024, device))
    tok = logits.argmax(-1)
    res = {k: [] for k in variants}
    names = list(variants)
    for r in range(4):
        for name in (names if r % 2 == 0 else names[::-1]):
            on, regs = variants[name]
            G.L2_PREFETCH, G.MAX_REGS = setting(on, 1), regs
            dev, wall = S.measure(runner, graph, state, tok)
            res[name].append((dev, wall))
            print(f"batch {batch} round {r + 1} {name}: device {dev:.4f} wall {wall:.4f}", flush=True)
    for k, v in sorted(res.items(), key=lambda kv: statistics.median(d for d, _ in kv[1])):
        print(f"batch {batch} {k}: device median {statistics.median(d for d, _ in v):.4f} "
              f"wall median {statistics.median(w for _, w in v):.4f}", flush=True)
    out[batch] = res
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ab_prefetch2.json"), "w"), indent=1)
