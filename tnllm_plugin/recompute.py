"""Linear layers whose input is recomputed in backward instead of saved (issue 14, the memory of a training step).

``linears_after(prefix, inputs, linears)`` is ``[linear(prefix(*inputs)) for linear in linears]``, but what it keeps
for backward is ``inputs`` and the fp32 weights, not ``prefix``'s output nor autocast's bf16 copies of the weights:
the prefix (cheap elementwise work: a block's SRMSNorm, the GLA output norm and gate, SGLU's product) runs again in
backward, under the autocast state of the forward (with the prefix's ``vjp`` where it has one: its output and a
function from the output's gradient to the inputs', so that no nested autograd pass runs inside the backward: the
385M step is partly bound by the host's time). The inputs are tensors that are kept anyway (the residual the
norm's own backward reads, the attention output and the gate, the product's factors), so each use removes an
activation of the linear layers' input width.

Outputs are those of the plain composition bit for bit (the same ops in the same dtypes, autocast's casts made
explicitly) and so are the products of the backward; a residual's gradient is the same sum, but added up in
another order (fp32 rounding). Only for plain ``nn.Linear`` layers and a deterministic prefix without parameters
(the caller's choice); tensor-parallel layers and evaluation take the plain composition.

It trades speed for memory (on one H200, the 385M step at 16384 tokens: 5-7 GB less, 4-20% slower; see
benchmarks/RESULTS.md). ``keep_linear_inputs(model)`` switches a model back to the plain composition, from outside,
as activation checkpointing is applied (the hosts' ``--keep-linear-inputs``), or keeps some of them only.
"""
import contextlib
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _matmul_dtype(y, device_type):
    """The dtype autocast would run a linear layer on ``y`` in (float64 is never autocast)."""
    if torch.is_autocast_enabled(device_type) and y.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device_type)
    return y.dtype


def _cast(t, dtype):
    """t in dtype, t itself when it already is: the training step calls this ~1000 times, and even a no-op .to()
    is a dispatch on the host, which a small model's step (host-bound) pays for."""
    return t if t.dtype == dtype else t.to(dtype)


def _autocast_as(device_type, enabled, dtype=None):
    """A context with autocast in the state (enabled, dtype); nothing to enter when it already is off."""
    if enabled:
        return torch.autocast(device_type, dtype=dtype)
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _LinearsAfter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prefix, n_inputs, *args):
        inputs, params = args[:n_inputs], args[n_inputs:]
        device_type = inputs[0].device.type
        ctx.prefix, ctx.n_inputs, ctx.device_type = prefix, n_inputs, device_type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        y = prefix(*inputs)
        dtype = _matmul_dtype(y, device_type)
        ctx.y_dtype, ctx.dtype = y.dtype, dtype
        yc = _cast(y, dtype)
        with _autocast_as(device_type, False):
            outs = [F.linear(yc, _cast(w, dtype), None if b is None else _cast(b, dtype))
                    for w, b in zip(params[0::2], params[1::2])]
        ctx.save_for_backward(*inputs, *params)
        ctx.set_materialize_grads(False)    # an output no loss used gives its layer no gradient, as autograd would
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outs):
        saved = ctx.saved_tensors
        inputs, params = saved[:ctx.n_inputs], saved[ctx.n_inputs:]
        input_backward = _Recomputed(ctx, inputs)
        y = input_backward.y
        y2 = _cast(y, ctx.dtype).reshape(-1, y.shape[-1])
        needs = ctx.needs_input_grad[2:2 + ctx.n_inputs]
        grad_y, grads = None, []
        for i, (w, b, g) in enumerate(zip(params[0::2], params[1::2], grad_outs)):
            need_w, need_b = ctx.needs_input_grad[2 + ctx.n_inputs + 2 * i:4 + ctx.n_inputs + 2 * i]
            if g is None:
                grads += [None, None]
                continue
            g2 = _cast(g.reshape(-1, g.shape[-1]), ctx.dtype)
            # the products torch's own linear backward computes, in its orientation; each layer's input gradient
            # back in y's dtype before they are summed, as autograd sums the gradients of autocast's casts
            if any(needs):
                step = _cast(g2.mm(_cast(w, ctx.dtype)), ctx.y_dtype)
                grad_y = step if grad_y is None else grad_y + step
            grads += [_cast(g2.t().mm(y2), w.dtype) if need_w else None,
                      _cast(g2.sum(0), b.dtype) if need_b and b is not None else None]
        input_grads = [None] * ctx.n_inputs
        if grad_y is not None:
            input_grads = input_backward(grad_y.reshape(y.shape), needs)
        return (None, None, *input_grads, *grads)


class _Recomputed:
    """The prefix's output again, in backward, and a callable for the inputs' gradients from the output's:
    the prefix's own vjp (no autograd pass) where it has one, else an autograd pass over the recomputed prefix."""

    def __init__(self, ctx, inputs):
        enabled, autocast_dtype = ctx.autocast
        vjp = getattr(ctx.prefix, "vjp", None)
        with _autocast_as(ctx.device_type, enabled, autocast_dtype):
            explicit = vjp(*inputs) if vjp is not None else None
            if explicit is not None:
                self.y, self._backward = explicit
                self._detached = None
            else:
                self._detached = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
                with torch.enable_grad():
                    self._graph_y = ctx.prefix(*self._detached)
                self.y = self._graph_y.detach()

    def __call__(self, grad_y, needs):
        if self._detached is None:
            grads = self._backward(grad_y)
            return [g if need else None for g, need in zip(grads, needs)]
        wanted = [x for x, need in zip(self._detached, needs) if need and x.requires_grad]
        found = dict(zip(map(id, wanted), torch.autograd.grad(self._graph_y, wanted, grad_y)))
        return [found.get(id(x)) for x in self._detached]


class Product:
    """torch.mul(a, b) as a prefix (SGLU's product), with its vjp: autograd's own products, without autograd."""

    def __call__(self, a, b):
        return a * b

    def vjp(self, a, b):
        return a * b, lambda g: (g * b, g * a)


# The outputs a block's layers may recompute in backward instead of keeping (what the next linear layer reads): the
# token norm's (QKVU's input), GLA's normalised and gated output (W_o's), the channel norm's (SGLU's pair's) and
# SGLU's product (W_3's). Each module with a ``recompute_linear_inputs`` attribute holds the set of its own it
# recomputes (RECOMPUTES lists them).
RECOMPUTABLE = ("token_norm", "out_gate", "channel_norm", "sglu_product")


def keep_linear_inputs(model: nn.Module, keep=True) -> nn.Module:
    """Every module of ``model`` that calls linears_after (those with a ``recompute_linear_inputs`` attribute)
    keeps the inputs named in ``keep`` (names of RECOMPUTABLE; True: all of them, the plain composition; False: none,
    the model's default) for backward and recomputes the others. Returns the model."""
    if keep is True or keep is False:
        kept = set(RECOMPUTABLE) if keep else set()
    else:
        kept = {keep} if isinstance(keep, str) else set(keep)
        unknown = sorted(kept - set(RECOMPUTABLE))
        if unknown:
            raise ValueError(f"keep_linear_inputs: unknown {unknown}; known: {list(RECOMPUTABLE)}")
    for module in model.modules():
        if hasattr(module, "recompute_linear_inputs"):
            module.recompute_linear_inputs = frozenset(module.RECOMPUTES) - kept
    return model


def linears_after(prefix: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                  linears: Sequence[nn.Module], recompute: bool = True) -> List[torch.Tensor]:
    """``[linear(prefix(*inputs)) for linear in linears]`` keeping ``inputs`` for backward instead of the prefix's
    output (recomputed there); with ``recompute=False`` the plain composition. ``prefix`` must be deterministic and
    hold no parameters."""
    plain = (not recompute or not torch.is_grad_enabled() or any(type(m) is not nn.Linear for m in linears)
             or not (any(x.requires_grad for x in inputs) or any(p.requires_grad for m in linears
                                                                   for p in m.parameters())))
    if plain:
        y = prefix(*inputs)
        return [m(y) for m in linears]
    params = [t for m in linears for t in (m.weight, m.bias)]
    return list(_LinearsAfter.apply(prefix, len(inputs), *inputs, *params))
