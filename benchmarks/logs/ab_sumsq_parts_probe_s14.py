"""Ran in the fourteenth session, call 4, b3e9de7's parts and prefetch plus the probe knobs SUMSQ_PARTS, L2_PREFETCH, MAX_REGS (removed before the commit); kept as the record of the A/B, not a tool.

One process: the decode GEMVs' norms from the sums of squares in parts (x_sumsq, written by the kernel before)
against the norm pass that reads the rows again (SUMSQ_PARTS False), each with and without the L2 prefetch before
the PDL wait + a 128-register cap, at batches 16, 8, 4, 1: each variant in a freshly captured graph decoder,
alternated four rounds, device and wall ms as decode_tiles_in_step.measure; the first step's logits of each
variant against the norm pass's."""
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
variants = {"norm pass": (False, 0, None), "norm pass+pf+reg": (False, 1, 128), "parts": (True, 0, None),
            "parts+pf+reg": (True, 1, 128), "parts+pf": (True, 1, None)}
out = {}
for batch in [int(b) for b in sys.argv[1].split(",")]:
    names = list(variants)
    with torch.no_grad():
        state, logits = runner.prefill(D.make_prompt(D.FULL, batch, 1024, device))
    tok = logits.argmax(-1)
    ref = None
    for name in names:
        G.SUMSQ_PARTS, G.L2_PREFETCH, G.MAX_REGS = variants[name]
        with torch.no_grad():
            dec = graph(runner.model, D.with_positions(state, device))
            y = dec(tok).float()
        ref = y if ref is None else ref
        print(f"batch {batch} {name}: first step logits max |diff| vs norm pass {(y - ref).abs().max().item():.3e} "
              f"(logits max {ref.abs().max().item():.2f}), greedy equal {torch.equal(y.argmax(-1), ref.argmax(-1))}",
              flush=True)
        del dec
    res = {k: [] for k in names}
    for r in range(4):
        for name in (names if r % 2 == 0 else names[::-1]):
            G.SUMSQ_PARTS, G.L2_PREFETCH, G.MAX_REGS = variants[name]
            dev, wall = S.measure(runner, graph, state, tok)
            res[name].append((dev, wall))
            print(f"batch {batch} round {r + 1} {name}: device {dev:.4f} wall {wall:.4f}", flush=True)
    for k, v in sorted(res.items(), key=lambda kv: statistics.median(d for d, _ in kv[1])):
        print(f"batch {batch} {k}: device median {statistics.median(d for d, _ in v):.4f} "
              f"wall median {statistics.median(w for _, w in v):.4f}", flush=True)
    out[batch] = res
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ab_sumsq.json"), "w"), indent=1)
