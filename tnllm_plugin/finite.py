"""Opt-in detection of NaN and inf in TransNormerLLM, reported by layer and step instead of silently propagated.

    check = FiniteCheck(model)          # or: with FiniteCheck(model): ...   (fairseq: --check-finite)
    model(tokens)                       # raises NonFiniteError at the first non-finite tensor

Forward hooks watch, in the order the model computes them: the embedding output, each layer's incoming attention
state (a decode state passed in), its attention output and new attention state, the block output, and the logits.
The first non-finite one raises, naming the step, the layer, the tensor and where in it (batch row, position or
head). The hidden states that enter an SRMSNorm (embedding and block outputs) are also refused when their mean
square overflows fp32 (|x| beyond ~1e19): the norm then returns zeros, finite and wrong, instead of a NaN. The step
is the training update when a host sets it (the fairseq adapter does, through set_num_updates), else the count of
forward calls since the check was installed (in generation: 1 is the prefill, then one per decoded token).
Each check reads one flag back from the device: opt-in, for hunting a divergence; without a FiniteCheck installed
the model has no hooks and pays nothing.
"""
from typing import Optional

# the axes of the tensors named in the messages
HIDDEN = "[batch, position, channel]"
STATE = "[batch, head, key, value]"


class NonFiniteError(FloatingPointError):
    pass


class FiniteCheck:
    """Hooks on ``model`` (a TransNormerLLM or a fairseq model around one) until ``remove()`` or the end of a
    ``with`` block; ``calls`` counts forward calls, ``update`` is set by a training host."""

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
                    lambda mod, args, out, i=i: self._check(out[0], f"layer {i}: block output {HIDDEN}", True)),
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
        return f"after {self.update} updates" if self.update is not None else f"in forward call {self.calls}"

    def _count(self, module, args):
        self.calls += 1

    def _embedding(self, module, args, out):
        try:
            self._check(out, f"embedding output {HIDDEN}", True)
        except NonFiniteError as e:      # name the embedding rows at fault
            bad = ~out.detach().float().square().mean(-1).isfinite()
            raise NonFiniteError(f"{e} (the rows of token ids {sorted(set(args[0][bad].tolist()))[:5]})") from None

    def _mixer_out(self, i, out):
        o, state = out
        self._check(state, f"layer {i}: attention state {STATE}")     # first: an overflow there makes o NaN too
        self._check(o, f"layer {i}: attention output {HIDDEN}")

    def _check(self, t, what: str, enters_norm: bool = False):
        if t is None:
            return
        t = t.detach()
        if not bool(t.isfinite().all()):
            bad = ~t.isfinite()
            place = tuple(bad.nonzero()[0].tolist())
            kinds = [k for k, mask in (("NaN", t.isnan()), ("inf", t.isinf())) if bool(mask.any())]
            raise NonFiniteError(f"{'/'.join(kinds)} {self.step}, {what} ({int(bad.sum())} of {t.numel()} "
                                 f"values, the first at {place})")
        if enters_norm:
            overflow = ~t.float().square().mean(-1).isfinite()
            if bool(overflow.any()):
                place = tuple(overflow.nonzero()[0].tolist())
                raise NonFiniteError(f"overflow {self.step}, {what}: values up to {float(t.abs().max()):.3g}, "
                                     f"whose mean square overflows fp32 (the norm they enter would return zeros), "
                                     f"the first vector at {place}")
