"""Norms of a model spread over ranks, each value counted once; and clipping by such a norm.

A rank holds parts of the model's tensors: whole parameters, slices of them (its shard of a
chunk), its tensor-parallel parts. Along some axes every rank holds values of its own (pipeline
stages, ZeRO shards); along the tensor-parallel axis some values are held alike by several ranks
(a LayerNorm gain by all of them, a 2D layer's bias by one row of the grid). The squared norm
of the whole model is the sum over the ranks of

    Σ over this rank's parts  |part|² / replicas(part)

where `replicas` is how many ranks hold the part's values. This module is the one place that
counts them: `replicas` (the rule), `squares` (one rank's share), `sum_over` (one all-reduce
per axis), `global_norm` (the three together); `clip_coef` and `clip_` turn a norm into
clipping. The data-parallel wrapper, the pipeline wrapper, the chunk optimizer and LAMB / LARS
(`core.optim.split_norms`) all count with them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor

from core.distributed.comm import AxisGroup, all_reduce_


def replicas(param: Tensor, tp: AxisGroup | None) -> int:
    """How many ranks of the tensor-parallel axis `tp` hold the same values as this rank's part
    of `param`: the `tp_replicas` that `core.tensor` layers give their parameters, or the whole
    axis for any other parameter (replicated on every tp rank); 1 without tensor parallelism."""
    if tp is None or tp.size == 1:
        return 1
    return getattr(param, "tp_replicas", tp.size)


def _wide(t: Tensor) -> Tensor:
    """`t` in float32 at least (no copy of a float32 or float64 tensor)."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def sum_of_squares(t: Tensor) -> Tensor:
    """Σ t², a 0-dim float64 tensor on t's device (the norm accumulated in t's precision, float32
    at least, then squared in float64)."""
    return torch.linalg.vector_norm(_wide(t)).double().square()


def squares(parts: Iterable[tuple[Tensor, int]]) -> Tensor:
    """This rank's share of a squared norm: Σ |t|² / r over its (tensor, replicas) parts, a 0-dim
    float64 tensor on the first part's device (on the host when there is none)."""
    by_count: dict[int, list[Tensor]] = {}
    for t, r in parts:   # one batched norm per replica count, not one kernel per tensor
        by_count.setdefault(r, []).append(_wide(t))
    sums = [torch.nn.utils.get_total_norm(ts).double().square() / r for r, ts in by_count.items()]
    if not sums:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([s.to(sums[0].device) for s in sums]).sum()


def sum_over(x: Tensor, axes: Sequence[AxisGroup | None]) -> Tensor:
    """`x` (partial sums of any shape) summed over each axis of size > 1, one all-reduce per axis
    on that axis's device; returned on x's device (x itself may be overwritten)."""
    device = x.device
    for axis in axes:
        if axis is not None and axis.size > 1:
            x = all_reduce_(x.to(axis.device), axis, "sum")
    return x.to(device)


def gradients(params: Iterable[Tensor], tp: AxisGroup | None) -> list[tuple[Tensor, int]]:
    """The (gradient, replicas) parts of the parameters that have a gradient."""
    return [(p.grad, replicas(p, tp)) for p in params if p.grad is not None]


def global_norm(parts: Iterable[tuple[Tensor, int]], axes: Sequence[AxisGroup | None]) -> Tensor:
    """The norm of the whole model from every rank's (tensor, replicas) parts, summed over `axes`
    (the tensor-parallel axis, and those along which ranks hold different values: pipeline
    stages, ZeRO shards; not those that replicate them, such as data parallelism's). A 0-dim
    float64 tensor; every rank of `axes` gets the same value."""
    return sum_over(squares(parts), axes).sqrt()


def clip_coef(norm: Tensor, max_norm: float) -> Tensor:
    """The factor that brings gradients of norm `norm` down to `max_norm`, 1 when they are within
    it: min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ takes it."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def clip_(params: Iterable[Tensor], coef: Tensor) -> None:
    """Multiply every gradient of `params` by `coef` (a 0-dim tensor), in place."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
