"""What one TransNormerLLM training step keeps for backward, tensor by tensor (issue 14, the memory of a step).

Counted with torch.autograd.graph.saved_tensors_hooks over the forward pass of the train_throughput.py step (bf16
autocast over fp32 weights, then the loss): every tensor an autograd node saves, each storage once (a view keeps
its whole storage alive), attributed to the module whose forward saved it and named by the autograd nodes that
hold it. Parameters saved as they are cost nothing extra; their bf16 copies made by autocast do.

On the CPU, the GPU kernels' own saves are stood in for: the attention and SRMSNorm compute with their PyTorch
forms but save for backward exactly what the Triton kernels' autograd Functions save (LightningAttentionFunction:
q, k, v as given, the fp32 slope, the segment-start states of a GPU of --sms multiprocessors; _SRMSNormFunction:
x and u made contiguous, the fp32 rstd), so the count is the GPU step's; CPU autocast makes the same dtype
choices as CUDA autocast for this model's ops. The stand-ins cannot run a backward (nothing here needs one).

The 385M widths and vocabulary at the step's batch and sequence length, with fewer layers (--layers, default 2:
layer 0 has LRPE, the others do not), extrapolated to the full depth: the layers beyond the measured ones are
copies of the last measured one. The lower bound of the step's peak is then the weights and AdamW's two states
(fp32, 12 bytes per parameter; the gradients are None between steps) plus what is saved; the loss's own
temporaries come on top (the plain loss: [tokens, vocab] fp32 gradients at the start of backward; the chunked
one: one chunk's fp32 logits and their bf16 gradient in the forward).

    python benchmarks/saved_memory.py                               # both losses, batch 8 x 2048 tokens
    python benchmarks/saved_memory.py --loss fused --batch 2 --seq 8192 --json out.json
    python benchmarks/saved_memory.py --no-recompute   # the linear layers keep their inputs (the previous step)
"""
import argparse
import collections
import json
import os
import re
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tnllm_kernels.lightning_attention import lightning_attention_chunk  # noqa: E402
from tnllm_kernels.lightning_attention.triton_chunk import _plan  # noqa: E402
from tnllm_kernels.srmsnorm import srms_norm_reference  # noqa: E402
from tnllm_plugin import model as model_module  # noqa: E402
from tnllm_plugin.presets import preset_config  # noqa: E402
from tnllm_plugin.recompute import keep_linear_inputs  # noqa: E402

MB = 1e6


# ---------------------------------------------------------------------------------------------------------
# What the Triton kernels save, for a CPU count

class AttentionSaves(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slope, block_size, sms):
        with torch.no_grad():
            o, final = lightning_attention_chunk(q, k, v, slope, None, block_size)
        b, n, h, dk = q.shape
        dv = v.shape[-1]
        # as the Triton walks split the sequence; where the Gluon walks run (Hopper, 16-bit heads of 128) the plan may
        # take fewer segments (one_an_sm), so this counts at most what the kernel saves
        segments = _plan(b, n, h, dk, dv, block_size, sms)["NSEG"]
        states = torch.empty(b * h, segments, dk, dv) if segments > 1 else None
        ctx.save_for_backward(q, k, v, slope.float(), states)
        return o, final

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("a stand-in that counts the Triton kernel's saved tensors; no backward")


class NormSaves(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, u, eps):
        with torch.no_grad():
            y = srms_norm_reference(x, eps)
            y = y * u if u is not None else y
        d = x.shape[-1]
        rstd = torch.empty(x.numel() // d, dtype=torch.float32)
        ctx.save_for_backward(x.reshape(-1, d).contiguous(), None if u is None else u.reshape(-1, d).contiguous(),
                              rstd)
        return y

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("a stand-in that counts the Triton kernel's saved tensors; no backward")


def stand_in_gpu_kernels(sms):
    model_module.lightning_attention = (
        lambda q, k, v, slope, state=None, block_size=64: AttentionSaves.apply(q, k, v, slope, block_size, sms))
    model_module.srms_norm = lambda x, eps=1e-6: NormSaves.apply(x, None, eps)
    model_module.srms_norm_gate = lambda x, u, eps=1e-6: NormSaves.apply(x, u, eps)


# ---------------------------------------------------------------------------------------------------------
# The count

def saved_tensors(model, tokens, target, loss_kind, chunk):
    """Forward of one training step; returns the saved storages [dict(bytes, dtype, shape, module, nodes, kind)]."""
    names = {m: n for n, m in model.named_modules()}
    params = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}
    stack = ["loss"]
    hooks = []
    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, args: stack.append(names[mod] or "model")))
        hooks.append(m.register_forward_hook(lambda mod, args, out: stack.pop() and None))   # None: output kept
    found = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in found:
            found[key] = dict(bytes=storage.nbytes(), dtype=str(t.dtype).replace("torch.", ""), shape=tuple(t.shape),
                              module=stack[-1], nodes=set(), param=params.get(key))
        return t

    device = tokens.device.type
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device, dtype=torch.bfloat16):
            if loss_kind == "plain":
                logits, _ = model(tokens)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
            else:
                hidden, _ = model(tokens, return_hidden=True)
                loss = model.chunked_lm_loss(hidden, target, reduction="mean", chunk_size=chunk)
    for h in hooks:
        h.remove()
    name_nodes(loss.grad_fn, found)
    # a parameter's shape: autocast's bf16 copies of weights and the chunked loss's gradient of the LM head
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape[::-1]) for p in model.parameters()}
    for rec in found.values():
        rec["kind"] = "parameter" if rec["param"] else "weight-sized" if rec["shape"] in shapes else "activation"
    return list(found.values()), loss


def name_nodes(root, found):
    """Which autograd nodes hold each saved storage (e.g. MmBackward0.mat2), from the graph of the loss."""
    seen, todo = set(), [root]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        held = []
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    value = getattr(node, attr)
                except RuntimeError:
                    continue
                values = value if isinstance(value, (list, tuple)) else [value]
                held += [(attr[len("_saved_"):], t) for t in values if isinstance(t, torch.Tensor)]
        if hasattr(node, "saved_tensors"):          # a custom autograd Function
            held += [(f"saved[{i}]", t) for i, t in enumerate(node.saved_tensors) if t is not None]
        for what, t in held:
            rec = found.get(t.untyped_storage().data_ptr())
            if rec is not None:
                rec["nodes"].add(f"{type(node).__name__.replace('Backward0', '').replace('Backward', '')}.{what}")
        todo.extend(fn for fn, _ in node.next_functions)


def place(module):
    """(layer index or None, the module's name inside its layer)."""
    m = re.match(r"layers\.(\d+)\.?(.*)", module)
    return (int(m.group(1)), m.group(2) or "(block)") if m else (None, module)


def report(records, s, loss_kind):
    lines = [f"## loss: {loss_kind}, batch {s['batch']} x {s['seq']} tokens"
             f"{', linear layers keep their inputs' if s['no_recompute'] else ''}", ""]
    n_layers, tokens = s["layers"], s["batch"] * s["seq"]
    per_layer = collections.defaultdict(list)
    outside = []
    for r in records:
        if r["kind"] == "parameter":
            continue
        layer, name = place(r["module"])
        (per_layer[layer] if layer is not None else outside).append(dict(r, name=name))

    def rows(items):
        out = ["| module | held by | shape | dtype | kind | MB |", "|---|---|---|---|---|---|"]
        for r in sorted(items, key=lambda r: -r["bytes"]):
            out.append(f"| {r['name']} | {', '.join(sorted(r['nodes'])) or '?'} | {list(r['shape'])} | {r['dtype']} "
                       f"| {r['kind']} | {r['bytes'] / MB:.1f} |")
        return out

    def total(items, kind=None):
        return sum(r["bytes"] for r in items if kind is None or r["kind"] == kind)

    for layer in sorted(per_layer)[:2]:
        lines += [f"### layer {layer} ({'with' if layer in s['lrpe_layers'] else 'without'} LRPE): "
                  f"{total(per_layer[layer]) / MB:.1f} MB at {tokens} tokens", ""] + rows(per_layer[layer]) + [""]
    lines += [f"### outside the blocks (embedding, final norm, LM head, loss): {total(outside) / MB:.1f} MB", ""]
    lines += rows(outside) + [""]

    # the full depth: the layers beyond the measured ones copy the last measured one
    last = per_layer[max(per_layer)]
    blocks = sum(total(v) for v in per_layer.values()) + (s["target_layers"] - n_layers) * total(last)
    weight_sized = (sum(total(v, "weight-sized") for v in per_layer.values())
                    + (s["target_layers"] - n_layers) * total(last, "weight-sized") + total(outside, "weight-sized"))
    full = blocks + total(outside)
    static = 12 * s["target_params"]
    lines += [f"measured: {(sum(total(v) for v in per_layer.values()) + total(outside)) / MB:.1f} MB saved "
              f"({n_layers} layers, batch {s['batch']} x {s['seq']} tokens); at {s['target_layers']} layers: "
              f"{full / 1e9:.2f} GB saved for backward (blocks {blocks / 1e9:.2f}, outside them "
              f"{total(outside) / 1e9:.2f}; weight-sized, as autocast's bf16 weight copies, {weight_sized / 1e9:.2f}); "
              f"with the fp32 weights and AdamW states ({s['target_params'] / 1e6:.1f}M parameters, "
              f"{static / 1e9:.2f} GB): {(full + static) / 1e9:.2f} GB before the loss's temporaries", ""]
    return "\n".join(lines), dict(saved_gb=full / 1e9, blocks_gb=blocks / 1e9, outside_gb=total(outside) / 1e9,
                                  weight_sized_gb=weight_sized / 1e9, static_gb=static / 1e9,
                                  per_layer_mb={i: total(v) / MB for i, v in per_layer.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loss", choices=("plain", "fused", "both"), default="both")
    ap.add_argument("--layers", type=int, default=2, help="layers measured (default 2: one with LRPE, one without)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=64000)
    ap.add_argument("--chunk", type=int, default=4096, help="tokens per chunk of the fused loss")
    ap.add_argument("--target-layers", type=int, default=24)
    ap.add_argument("--sms", type=int, default=132, help="GPU multiprocessors, for the attention's segment states "
                                                       "(132: H100/H200)")
    ap.add_argument("--no-recompute", action="store_true",
                    help="linear layers keep their inputs (tnllm_plugin.recompute.keep_linear_inputs)")
    ap.add_argument("--json", help="write the records and totals here")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset_config("385m", vocab_size=args.vocab, n_layers=args.layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        stand_in_gpu_kernels(args.sms)
    model = keep_linear_inputs(model_module.TransNormerLLM(cfg).to(device), args.no_recompute)
    seq = args.seq
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, args.vocab, (args.batch, seq), generator=g).to(device)
    target = torch.randint(3, args.vocab, (args.batch, seq), generator=g).to(device)
    with torch.device("meta"):
        target_params = model_module.TransNormerLLM(replace(cfg, n_layers=args.target_layers)).num_parameters(False)
    s = dict(layers=args.layers, batch=args.batch, seq=seq, target_layers=args.target_layers,
             target_params=target_params, lrpe_layers=cfg.lrpe_layers, no_recompute=args.no_recompute)
    out, texts = {}, []
    for kind in (("plain", "fused") if args.loss == "both" else (args.loss,)):
        t0 = time.perf_counter()
        records, loss = saved_tensors(model, tokens, target, kind, args.chunk)
        text, totals = report(records, s, kind)
        texts.append(text + f"(loss {loss.item():.4f}; {time.perf_counter() - t0:.0f} s on {device.type})\n")
        out[kind] = dict(totals, loss=loss.item(), records=[{k: (sorted(v) if isinstance(v, set) else v)
                                                            for k, v in r.items()} for r in records])
        del loss, records
    print("\n".join(texts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(settings=vars(args), results=out), f, indent=1, default=str)


if __name__ == "__main__":
    main()
