"""One process: (1) A/B of the decoding step's final norm + LM head as one GEMV (today's tree) against the norm
kernel + cuBLAS (the composition), each in a freshly captured graph decoder, alternated, device and wall ms as
decode_tiles_in_step.measure; (2) where the wall time of one graph decoder call goes at batch 16 (host side).

Ran (session 13, call 3) at commit 8aa5cc1, whose model has _norm_and_head (reverted in eef5b9a). Kept as
the record of the A/B and of the host-side breakdown, not a tool.
"""
import json, os, statistics, sys, time
import torch
sys.path.insert(0, "benchmarks")
import decode as D
import decode_tiles_in_step as S
from tnllm_plugin.model import TransNormerLLM
fused = TransNormerLLM._norm_and_head
composed = lambda self, x: self.lm_head(self.final_norm(x))
device = torch.device("cuda")
torch.manual_seed(0)
runner = D.Ours(D.FULL, device, torch.bfloat16)
graph, _ = D.graph_decoder(device)
out = {"ab": {}, "host": {}}
wins = []
for batch in [int(b) for b in sys.argv[1].split(",")]:
    with torch.no_grad():
        state, logits = runner.prefill(D.make_prompt(D.FULL, batch, 1024, device))
    tok = logits.argmax(-1)
    res = {"composed": [], "fused": []}
    for r in range(4):
        for name in (["composed", "fused"] if r % 2 == 0 else ["fused", "composed"]):
            TransNormerLLM._norm_and_head = fused if name == "fused" else composed
            dev, wall = S.measure(runner, graph, state, tok)
            res[name].append((dev, wall))
            print(f"batch {batch} round {r + 1} {name}: device {dev:.4f} wall {wall:.4f}", flush=True)
    TransNormerLLM._norm_and_head = fused
    med = {k: (statistics.median(d for d, _ in v), statistics.median(w for _, w in v)) for k, v in res.items()}
    for k, (d, w) in med.items():
        print(f"batch {batch} {k}: device median {d:.4f} wall median {w:.4f}", flush=True)
    wins.append(med["fused"][0] < med["composed"][0])
    out["ab"][batch] = res
    if batch == 16:         # host side of one call, fused head
        with torch.no_grad():
            dec = graph(runner.model, D.with_positions(state, device))
            for _ in range(4):
                tok = dec(tok).argmax(-1)
            def t(fn, n=48):
                xs = []
                for _ in range(n):
                    torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
                    xs.append((time.perf_counter() - t0) * 1e3)
                return statistics.median(xs)
            def host_only(fn, n=48):
                xs = []
                for _ in range(n):
                    torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); xs.append((time.perf_counter() - t0) * 1e3)
                    torch.cuda.synchronize()
                return statistics.median(xs)
            host = dict(
                call_ms=t(lambda: dec(tok)),
                replay_only_ms=t(lambda: dec.graph.replay()),
                copy_and_replay_ms=t(lambda: (dec.tokens.copy_(tok[:, None]), dec.graph.replay())),
                replay_then_clone_ms=t(lambda: (dec.graph.replay(), dec.logits.clone())),
                host_of_call_ms=host_only(lambda: dec(tok)),
                host_of_replay_ms=host_only(lambda: dec.graph.replay()),
                empty_sync_ms=t(lambda: None),
                graph_nodes=None)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(32):
                dec.graph.replay()
            end.record(); torch.cuda.synchronize()
            host["device_ms"] = start.elapsed_time(end) / 32
        out["host"] = host
        print("host side, batch 16:", json.dumps(host), flush=True)
verdict = "fused" if all(wins) else "composed"
print("verdict", verdict, flush=True)
open(os.path.join(os.environ.get("OUT", "."), "head_verdict"), "w").write(verdict)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ab_head.json"), "w"), indent=1)
