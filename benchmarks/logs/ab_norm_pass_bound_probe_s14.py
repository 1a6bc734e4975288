"""Ran in the fourteenth session, call 3, the same probe tree plus a NO_NORM_PASS knob (the pass skipped, r = 1); kept as the record of the A/B, not a tool.

One process, timing only: how much of the decode step the GEMVs' norm pass costs (the pass skipped, r = 1: wrong
outputs, a bound on what moving the sum of squares elsewhere could save), with and without the L2 prefetch + 128
register cap, at batches 16, 8, 1; then the host side of one graph decoder call at batch 16 with and without the
token copy."""
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
dot_only = lambda v: (lambda n, k, glu: v)
variants = {"off": (0, None, False), "pf+reg": (1, 128, False), "no-norm-pass": (0, None, True),
            "no-norm-pass+pf+reg": (1, 128, True)}
out = {}
for batch in [int(b) for b in sys.argv[1].split(",")]:
    names = list(variants) if batch >= 5 else ["off", "no-norm-pass"]
    with torch.no_grad():
        state, logits = runner.prefill(D.make_prompt(D.FULL, batch, 1024, device))
    tok = logits.argmax(-1)
    res = {k: [] for k in names}
    for r in range(4):
        for name in (names if r % 2 == 0 else names[::-1]):
            G.L2_PREFETCH, G.MAX_REGS, G.NO_NORM_PASS = variants[name]
            dev, wall = S.measure(runner, graph, state, tok)
            res[name].append((dev, wall))
            print(f"batch {batch} round {r + 1} {name}: device {dev:.4f} wall {wall:.4f}", flush=True)
    for k, v in sorted(res.items(), key=lambda kv: statistics.median(d for d, _ in kv[1])):
        print(f"batch {batch} {k}: device median {statistics.median(d for d, _ in v):.4f} "
              f"wall median {statistics.median(w for _, w in v):.4f}", flush=True)
    out[batch] = res
    if batch == 16:
        G.L2_PREFETCH, G.MAX_REGS, G.NO_NORM_PASS = 0, None, False
        with torch.no_grad():
            dec = graph(runner.model, D.with_positions(state, device))
            t16 = tok
            for _ in range(4):
                t16 = dec(t16).argmax(-1)
            def t(fn, n=64):
                xs = []
                for _ in range(n):
                    torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
                    xs.append((time.perf_counter() - t0) * 1e3)
                return statistics.median(xs)
            host = {}
            for rr in range(3):
                for key, fn in (("call (copy, replay, clone)", lambda: dec(t16)),
                                ("replay, clone (no copy)", lambda: (dec.graph.replay(), dec.logits.clone())),
                                ("copy, replay", lambda: (dec.tokens.copy_(t16[:, None]), dec.graph.replay())),
                                ("replay", lambda: dec.graph.replay()),
                                ("decode.py's lambda", lambda: dec(t16[:, None][:, 0]))):
                    host.setdefault(key, []).append(t(fn))
            for key, v in host.items():
                print(f"host side batch 16: {key}: {' / '.join(f'{x:.4f}' for x in v)} ms", flush=True)
            out["host"] = host
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ab_normpass.json"), "w"), indent=1)
