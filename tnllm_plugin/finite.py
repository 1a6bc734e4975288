"""Opt-in detection of NaN and inf in TransNormerLLM, reported by layer and step instead of silently propagated.

    check = FiniteCheck(model)          # or: with FiniteCheck(model): ...   (fairseq: --check-finite)
    model(tokens)                       # raises NonFiniteError at the first non-finite tensor

Forward hooks watch, in the order the model computes them: the embedding output, each layer's incoming attention
state (a decode state passed in), its attention output and new attention state, the block output, and the logits.
The first non-finite one raises, naming the step, the layer, the tensor and where in it (batch row, position or
head). ``step`` is the training update when a host sets it (the fairseq adapter does, through set_num_updates),
else the count of forward calls since the check was installed (in generation: 1 is the prefill, then one per
decoded token). Each check reads one flag back from the device: opt-in, for hunting a divergence; without a
FiniteCheck installed the model has no hooks and pays nothing.
"""
from typing import Optional

import torch


# the axes of the tensors named in the messages
HIDDEN = "[batch, position, channel]"
STATE = "[batch, head, key, value]"


class NonFiniteError(FloatingPointError):
    pass


class FiniteCheck:
    def __init__(self, model):
        from .generation import unwrap_model       # also accepts fairseq's model or decoder
        self.model = unwrap_model(model)
        self.calls = 0
        self.update: Optional[int] = None
        m = self.model
        self.handles = [m.register_forward_pre_hook(self._count),
                        m.embed_tokens.register_forward_hook(self._embedding),
                        m.lm_head.register_forward_hook(lambda mod, args, out: self._check(out, "logits"))]
        for i, layer in enumerate(m.layers):
            mixer = layer.token_mixer
            self.handles += [
                mixer.register_forward_pre_hook(
                    lambda mod, args, i=i: self._check(args[1], f"layer {i}: incoming attention state {STATE}")),
                mixer.register_forward_hook(lambda mod, args, out, i=i: self._mixer_out(i, out)),
                layer.register_forward_hook(
                    lambda mod, args, out, i=i: self._check(out[0], f"layer {i}: block output {HIDDEN}")),
            ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    @property
    def step(self) -> str:
        return f"update {self.update}" if self.update is not None else f"forward call {self.calls}"

    def _count(self, module, args):
        self.calls += 1

    def _embedding(self, module, args, out):
        tokens = args[0]
        bad = ~out.isfinite().all(dim=-1)
        if bad.any():
            ids = sorted(set(tokens[bad].tolist()))[:5]
            self._check(out, f"embedding output {HIDDEN} (the rows of token ids {ids})")

    def _mixer_out(self, i, out):
        o, state = out
        self._check(state, f"layer {i}: attention state {STATE}")     # first: an overflow there makes o NaN too
        self._check(o, f"layer {i}: attention output {HIDDEN}")

    def _check(self, t, what: str):
        if t is None or bool(t.isfinite().all()):
            return
        bad = ~t.isfinite()
        place = tuple(bad.nonzero()[0].tolist())
        kinds = [k for k, mask in (("NaN", t.isnan()), ("inf", t.isinf())) if bool(mask.any())]
        raise NonFiniteError(f"{'/'.join(kinds)} at {self.step}, {what} ({int(bad.sum())} of {t.numel()} values, "
                             f"the first at {place})")
