"""Activation checkpointing that works whether parameters are ordinary tensors or live in chunks.

`Recompute` is what a model calls in place of `torch.utils.checkpoint.checkpoint`:
`recompute(block, x, ...)` runs `block(x, ...)` without keeping its activations, and backward
runs it again. Models take it from the session (`ModelParallel.recompute`; diffusers models:
`unet.enable_gradient_checkpointing(s.recompute)`).

With ordinary parameters it is torch's non-reentrant checkpoint. With chunked parameters
(`core.memory.ChunkedModel`) torch's checkpoint cannot work: it stores the tensors the
recomputed forward saves (the block's weights, views of chunks) outside the chunk hooks, and a
chunk may be evicted before the block's backward reads them. So the block runs as one autograd
node whose backward is a bracket (`ChunkedModel.recomputing`): the forward runs again under the
same hooks as the first one (chunks fetched and released per module, saved weights noted), and
the block's backward follows at once inside the bracket, fetching the weights it reads per
operation as the main backward does. The memory a checkpointed block needs is therefore what any
forward and backward need, one operation's chunks, not the whole block's. The recomputed forward
fetches its chunks like any forward, so the chunk manager's trace records them and its eviction
and prefetch follow the real order of use from the second step on.

The random-number state (for dropout) and the autocast state of the first forward are restored
for the recomputation, so it computes exactly what the first forward did.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.utils.checkpoint
from torch.utils import _pytree as pytree


class Recompute:
    """`recompute(fn, *args)`: `fn(*args)` with its activations recomputed in backward.

    `chunks` is set by the plugin that puts the parameters in chunks (the `ChunkedModel`, which
    offers `recomputing()`); None means ordinary parameters."""

    def __init__(self) -> None:
        self.chunks = None

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return fn(*args)
        if self.chunks is None:
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        flat, spec = pytree.tree_flatten(args)
        out_spec: list = []
        # `anchor` requires grad, so backward reaches the block even when no input does (the
        # first block of a model whose input is data): its parameters' gradients come from there
        anchor = torch.empty(0, requires_grad=True)
        outputs = _Bracket.apply(fn, self.chunks, spec, out_spec, anchor, *flat)
        return pytree.tree_unflatten(list(outputs), out_spec[0])

    def __repr__(self) -> str:
        return f"Recompute({'chunked' if self.chunks is not None else 'torch'})"


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    return [(device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
            if torch.is_autocast_enabled(device)]


class _Bracket(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, chunks, spec, out_spec, anchor, *flat):
        ctx.fn, ctx.chunks, ctx.spec = fn, chunks, spec
        ctx.autocast = _autocast_state()
        ctx.rng = torch.get_rng_state()
        ctx.cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        ctx.cuda_rng = torch.cuda.get_rng_state() if ctx.cuda else None
        ctx.is_tensor = [isinstance(x, torch.Tensor) for x in flat]
        ctx.others = [None if t else x for x, t in zip(flat, ctx.is_tensor)]
        ctx.save_for_backward(*(x for x in flat if isinstance(x, torch.Tensor)))
        with torch.no_grad():
            result = fn(*pytree.tree_unflatten(list(flat), spec))
        outputs, result_spec = pytree.tree_flatten(result)
        out_spec.append(result_spec)
        ctx.out_is_tensor = [isinstance(o, torch.Tensor) for o in outputs]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        flat = []
        for is_tensor, other in zip(ctx.is_tensor, ctx.others):
            if is_tensor:
                x = next(saved)
                x = x.detach().requires_grad_(x.requires_grad)
                flat.append(x)
            else:
                flat.append(other)
        devices = [torch.cuda.current_device()] if ctx.cuda else []
        with ctx.chunks.recomputing(), torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(ctx.rng)
            if ctx.cuda:
                torch.cuda.set_rng_state(ctx.cuda_rng)
            with torch.enable_grad(), contextlib.ExitStack() as stack:
                for device, dtype in ctx.autocast:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                result = ctx.fn(*pytree.tree_unflatten(flat, ctx.spec))
            outputs = pytree.tree_leaves(result)
            pairs = [(o, g) for o, g, t in zip(outputs, grads, ctx.out_is_tensor)
                     if t and o.requires_grad and g is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        inputs = [x.grad if isinstance(x, torch.Tensor) and x.requires_grad else None for x in flat]
        return (None, None, None, None, None, *inputs)
