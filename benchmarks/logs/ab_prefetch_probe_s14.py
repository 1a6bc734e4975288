"""Ran in the fourteenth session, call 1, on c2f76c6 plus the prefetch (HOW 1 lines, 2 bulk) and MAX_REGS knobs in triton_gemv (uncommitted); kept as the record of the A/B, not a tool.

One process: A/B/C of the decode GEMVs' L2 prefetch before the PDL wait (0 off, 1 per-line prefetch.global.L2,
2 bulk cp.async.bulk.prefetch.L2 per column) and of a register cap (maxnreg 128) at batches 16, 8, 5 (1 and 4: the
prefetch does not apply, one K tile a program), each variant in a freshly captured graph decoder, alternated four
rounds, device and wall ms as decode_tiles_in_step.measure. Then the host side of a call at batch 16."""
import json, os, statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
import decode as D
import decode_tiles_in_step as S
from tnllm_kernels.decode_linear import triton_gemv as G
device = torch.device("cuda")
torch.manual_seed(0)
runner = D.Ours(D.FULL, device, torch.bfloat16)
graph, _ = D.graph_decoder(device)
variants = {"off": (0, None), "lines": (1, None), "bulk": (2, None), "off_reg128": (0, 128), "lines_reg128": (1, 128)}
out = {}
for batch in [int(b) for b in sys.argv[1].split(",")]:
    with torch.no_grad():
        state, logits = runner.prefill(D.make_prompt(D.FULL, batch, 1024, device))
    tok = logits.argmax(-1)
    # outputs: every variant's first step equals the off variant's (same sums, same order: the prefetch moves no value)
    ref = None
    for name, (pf, regs) in variants.items():
        G.L2_PREFETCH, G.MAX_REGS = pf, regs
        with torch.no_grad():
            dec = graph(runner.model, D.with_positions(state, device))
            y = dec(tok).float()
        if ref is None:
            ref = y
        print(f"batch {batch} {name}: first step max |diff| vs off {(y - ref).abs().max().item():.3e}", flush=True)
        del dec
    res = {k: [] for k in variants}
    names = list(variants)
    for r in range(4):
        for name in (names if r % 2 == 0 else names[::-1]):
            G.L2_PREFETCH, G.MAX_REGS = variants[name]
            dev, wall = S.measure(runner, graph, state, tok)
            res[name].append((dev, wall))
            print(f"batch {batch} round {r + 1} {name}: device {dev:.4f} wall {wall:.4f}", flush=True)
    for k, v in res.items():
        print(f"batch {batch} {k}: device median {statistics.median(d for d, _ in v):.4f} "
              f"wall median {statistics.median(w for _, w in v):.4f}", flush=True)
    out[batch] = res
G.L2_PREFETCH, G.MAX_REGS = 1, None
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ab_prefetch.json"), "w"), indent=1)
