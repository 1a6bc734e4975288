"""Which streams a CUDA-graph decoder should warm up and capture on (torch on this machine): memory left behind per
decoder built and dropped, and whether dropping one decoder breaks another one still alive (cuBLAS keeps a workspace
per stream; newer torch clears a stream's workspaces when a graph captured on it is destroyed)."""
import gc, json, sys
import torch
from tnllm_plugin.model import DecodeState, TransNormerConfig, TransNormerLLM
from tnllm_plugin.generation import prefill

VARIANT = sys.argv[1]
SHARED = {}


def streams():
    if VARIANT == "now":                      # a new warm-up stream, capture on torch.cuda.graph's default stream
        return torch.cuda.Stream(), None
    if VARIANT == "shared_warmup":
        SHARED.setdefault("w", torch.cuda.Stream())
        return SHARED["w"], None
    if VARIANT == "own_both":                 # CUDAGraphStep's way: one new stream for warm-up and capture
        s = torch.cuda.Stream()
        return s, s
    if VARIANT == "shared_both":
        SHARED.setdefault("w", torch.cuda.Stream())
        return SHARED["w"], SHARED["w"]
    raise SystemExit(VARIANT)


class Decoder:
    def __init__(self, model, state):
        self.tokens = torch.zeros((state.positions.shape[0], 1), dtype=torch.long, device="cuda")
        self.state = DecodeState(kv=[s.clone() for s in state.kv], offset=state.offset, positions=state.positions.clone())
        side, cap = streams()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode_step_(self.tokens, self.state)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=cap):
            self.logits = model.decode_step_(self.tokens, self.state)[:, -1]
        for a, b in zip(self.state.kv, state.kv):
            a.copy_(b)
        self.state.positions.copy_(state.positions)

    def __call__(self, tok):
        self.tokens.copy_(tok[:, None])
        self.graph.replay()
        return self.logits.clone()


def main():
    torch.manual_seed(0)
    cfg = TransNormerConfig(vocab_size=32000, d_model=1024, n_layers=4, n_heads=8, glu_dim=2816)
    model = TransNormerLLM(cfg).cuda().to(torch.bfloat16).eval()
    out = dict(variant=VARIANT, torch=torch.__version__)
    with torch.no_grad():
        logits, state = prefill(model, [[5, 6, 7, 8]] * 16)
        tok = logits.argmax(-1)
        # reference: a fresh decoder's first step
        ref = Decoder(model, state)(tok)
        del_mem = []
        for i in range(6):
            d = Decoder(model, state)
            d(tok)
            del d
            gc.collect(); torch.cuda.synchronize()
            del_mem.append(torch.cuda.memory_allocated() / 2**20)
        out["allocated_MiB_after_each_dropped_decoder"] = [round(m, 1) for m in del_mem]
        # two alive, the first dropped, the second replayed while other tensors take the freed memory
        a = Decoder(model, state); a(tok)
        b = Decoder(model, state); b(tok)
        del a
        gc.collect(); torch.cuda.synchronize(); torch.cuda.empty_cache()
        junk = [torch.full((8 << 20,), 7.0, device="cuda") for _ in range(16)]     # 512 MiB of 7.0
        errs = []
        for _ in range(20):
            b.state.kv[0].copy_(state.kv[0])      # not needed for the check below: compare a step from the start
        for i in range(5):
            for s, t in zip(b.state.kv, state.kv):
                s.copy_(t)
            b.state.positions.copy_(state.positions)
            got = b(tok)
            errs.append(((got.float() - ref.float()).abs().max()).item())
        torch.cuda.synchronize()
        out["b_after_a_dropped_max_abs_diff"] = errs
        out["junk_intact"] = all(bool((j == 7.0).all()) for j in junk)
    print(json.dumps(out))


main()
