"""A whole training step (forward, loss, backward, optimizer step) captured once in a CUDA graph and replayed.

Why: a small model's step is bound by the host. The 385M step at 16384 tokens on one H200 keeps the GPU busy ~95 ms
but takes 103-136 ms: the rest is the host's (Python, autograd, one launch per kernel). A replayed CUDA graph
launches the whole step at once, so the step costs about the GPU's time only.

    step = CUDAGraphStep(train_step, warmup=3, check=check_batch)
    for x, y in batches:
        loss = step(x, y)           # one training step per call, the first ones eager, then replays

The contract (what a step_fn must do and what the caller must keep; ``CUDAGraphStep`` checks what it can):

* ``step_fn(*inputs) -> loss`` does one whole training step: forward, loss, backward, optimizer step and
  zero_grad (``set_to_none=True``: each replay's backward then writes the gradients instead of adding to the last
  ones). It returns the loss tensor.
* The inputs are CUDA tensors of the same shapes, dtypes and device at every call (those of the first call): the
  graph replays fixed kernels on fixed buffers. Drop a last partial batch, or make a second CUDAGraphStep for it.
* The optimizer is created with ``capturable=True`` (e.g. ``torch.optim.AdamW(params, fused=True,
  capturable=True)``): its step counter then lives on the GPU and is advanced by the replay. torch warns once during
  the eager warm-up that a capturable optimizer runs uncaptured; that is expected.
* A constant learning rate: a float ``lr`` is captured as a constant of the kernels. A schedule needs a tensor lr
  (on the GPU, changed in place between calls).
* No host syncs inside step_fn (``.item()``, ``.tolist()``, ``bool(tensor)``, shapes that depend on values): they
  cannot run during a capture. The model's own checks of its inputs that need one skip themselves while a capture
  is under way (``torch.cuda.is_current_stream_capturing()``); pass ``check`` so that bad input still fails early,
  with the model's message: it is called eagerly on every call's own inputs, before anything runs.
* The parameters, gradients' owners and optimizer state stay the same tensors: replays read and write the captured
  addresses. Loading a checkpoint in place (``copy_``) is fine; replacing the tensors (``load_state_dict`` of an
  optimizer, ``model.to(...)``) is not seen by the graph.
* Random ops (dropout) draw new numbers at each replay, but not the numbers the eager step would have drawn.

How: calls 1..warmup run step_fn eagerly on a side stream (``warmup_stream``), real training steps on the real
inputs (Triton autotuning, cuBLAS workspaces and the optimizer's state are created there, none of which may happen
during a capture). Call warmup + 1 copies its inputs into static buffers, captures step_fn on them and replays the
graph once (a capture records kernels without running them: that call's step must still happen). Later calls copy
their inputs into the static buffers and replay. So every call is exactly one training step and a loss curve through
CUDAGraphStep is comparable to the eager one step for step (on the same kernels, the same bits).

Memory: the graph keeps the step's activations in a private pool for as long as it lives. After the capture the
allocator's "allocated" counters may not show that pool (nothing is allocated at a replay); torch.cuda.memory_reserved
does. Drop the CUDAGraphStep to free it.
"""
import functools
from typing import Callable, Optional

import torch


@functools.lru_cache(maxsize=None)
def warmup_stream(device: torch.device) -> "torch.cuda.Stream":
    """The one side stream per device that every CUDA graph of this package warms up on (CUDAGraphStep and
    generation's CudaGraphDecoder). cuBLAS keeps a workspace (32 MiB on an H200) for each stream it has run on, until
    the process ends: with a new stream per graph, each one built left 32 MiB or more allocated (torch 2.11;
    benchmarks/RESULTS.md, fifteenth and seventeenth sessions). The captures themselves run on torch.cuda.graph's own
    stream, so no graph holds the warm-up stream's workspace."""
    return torch.cuda.Stream(device=device)


class CUDAGraphStep:
    def __init__(self, step_fn: Callable[..., torch.Tensor], warmup: int = 3,
                 check: Optional[Callable[..., None]] = None):
        """``step_fn(*inputs) -> loss``: one whole training step (see the module's docstring). ``warmup``: eager
        steps before the capture (at least 1). ``check(*inputs)``: optional, called eagerly on every call's inputs
        (host syncs allowed), to reject bad input with a message; the captured graph skips such checks."""
        if int(warmup) < 1:
            raise ValueError(f"warmup must be at least 1 (autotuning and the optimizer's state need an eager step "
                             f"before the capture), got {warmup}")
        self.step_fn = step_fn
        self.warmup = int(warmup)
        self.check = check
        self.calls = 0                  # training steps done (eager, the capture's replay, replays)
        self.signature = None           # (shape, dtype, device) of each input, from the first call
        self.graph = None
        self.static_inputs = None
        self.static_loss = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One training step on ``inputs``; returns its loss (a tensor of its own: the next step does not change
        it)."""
        self._check_inputs(inputs)
        if self.check is not None:
            self.check(*inputs)
        if self.calls < self.warmup:
            loss = self._eager_step(inputs)
        else:
            if self.graph is None:
                self._capture(inputs)
            else:
                for static, x in zip(self.static_inputs, inputs):
                    static.copy_(x)
            self.graph.replay()
            loss = self.static_loss.clone()     # the next replay overwrites static_loss
        self.calls += 1
        return loss

    def _check_inputs(self, inputs):
        """Tensors on CUDA, with the first call's shapes, dtypes and device: what a replay can take."""
        if not inputs:
            raise ValueError("CUDAGraphStep needs at least one input tensor (the graph's inputs are copied into "
                             "static buffers at each call)")
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"input {i} is a {type(x).__name__}; CUDAGraphStep takes tensors only")
            if not x.is_cuda:
                raise ValueError(f"CUDA graphs need CUDA tensors: input {i} is on {x.device}")
        signature = [(tuple(x.shape), x.dtype, x.device) for x in inputs]
        if self.signature is None:
            self.signature = signature
            return
        if len(signature) != len(self.signature):
            raise ValueError(f"CUDAGraphStep got {len(signature)} inputs; the first call had {len(self.signature)}")
        for i, (old, new) in enumerate(zip(self.signature, signature)):
            if old != new:
                raise ValueError(f"input {i} changed from shape {old[0]} {old[1]} on {old[2]} to shape {new[0]} "
                                 f"{new[1]} on {new[2]}: a CUDA graph replays fixed shapes (drop a last partial "
                                 f"batch, or make another CUDAGraphStep for these shapes)")

    def _eager_step(self, inputs):
        """step_fn as it is, on the side stream, ordered after the caller's work and before what the caller does
        next (PyTorch's "whole network capture" recipe: the warm-up runs on a side stream, as the capture will)."""
        side = warmup_stream(inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.step_fn(*inputs)
        # the caller's stream waits for the step, so its later work (and its freeing of the inputs and the loss,
        # whose blocks the side stream may reuse only after its own wait above) is ordered after it
        torch.cuda.current_stream().wait_stream(side)
        return loss.detach()

    def _capture(self, inputs):
        """Static copies of the inputs, then step_fn captured on them (the graph's kernels recorded, not run)."""
        self.static_inputs = [x.clone() for x in inputs]
        # the eager warm-up's freed activations sit in the allocator's cache, which the graph's private pool cannot
        # use: give them back, so they are not held beside the pool (torch.cuda.graph's entry does it too; said here
        # because the step's memory depends on it)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        # on torch.cuda.graph's own stream, not the warm-up's: a graph captured on a stream holds that stream's
        # cuBLAS workspace, and the warm-up stream is shared (see warmup_stream)
        with torch.cuda.graph(graph):
            loss = self.step_fn(*self.static_inputs)
        self.graph = graph                       # only a finished capture: a failed one is never replayed
        self.static_loss = loss.detach()         # its buffer in the pool, rewritten by every replay
