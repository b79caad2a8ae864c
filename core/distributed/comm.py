"""Collectives over one mesh axis: differentiable, and every call counted.

Each function takes an `AxisGroup` (one named axis of the `ParallelMesh`: its process group,
this rank's place in it, and the `CommStats` it reports to). Every call, including those
autograd makes in backward, is recorded as (axis, op) -> calls and bytes, so a test or a
benchmark can read exactly what a step communicated.

Bytes are counted one way for every op: **the bytes of the tensor this rank hands to the
call** (its input; for `recv`, the buffer it fills). An all_reduce of N fp32 values counts
4N bytes on each rank; an all_gather counts the local shard; a reduce_scatter counts the
full input.

Gradients follow the adjoint of each op over the sum of the ranks' losses: the backward of
all_reduce(sum) is all_reduce(sum), of all_gather a reduce_scatter, of reduce_scatter an
all_gather, of all_to_all the inverse all_to_all, of broadcast a reduce to the source.
Point-to-point `send`/`recv` are not differentiable: pipeline schedules drive the
backward of what they send explicitly.

An axis of size 1 communicates nothing: every op returns its input and nothing is counted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------

@dataclass
class OpCount:
    calls: int = 0
    bytes: int = 0


class CommStats:
    """Calls and bytes per (axis, op). One instance belongs to one mesh."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], OpCount] = defaultdict(OpCount)

    def record(self, axis: str, op: str, nbytes: int) -> None:
        c = self._counts[(axis, op)]
        c.calls += 1
        c.bytes += int(nbytes)

    def _select(self, axis: str | None, op: str | None):
        # an axis includes its sub-axes: "tp" counts "tp.row" and "tp.col" too
        return (c for (a, o), c in self._counts.items()
                if (axis is None or a == axis or a.startswith(axis + ".")) and (op is None or o == op))

    def calls(self, axis: str | None = None, op: str | None = None) -> int:
        return sum(c.calls for c in self._select(axis, op))

    def bytes(self, axis: str | None = None, op: str | None = None) -> int:
        return sum(c.bytes for c in self._select(axis, op))

    def as_dict(self) -> dict[str, dict[str, dict[str, int]]]:
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (a, o), c in sorted(self._counts.items()):
            out.setdefault(a, {})[o] = {"calls": c.calls, "bytes": c.bytes}
        return out

    def reset(self) -> None:
        self._counts.clear()


@dataclass(frozen=True)
class AxisGroup:
    """One axis of a mesh as seen from this rank."""

    name: str
    size: int
    rank: int                      # this process's index along the axis
    ranks: tuple[int, ...]         # global ranks along the axis, in axis order
    group: Any = None              # torch ProcessGroup; None = the default (whole-world) group
    stats: CommStats = field(default_factory=CommStats, compare=False)
    device: torch.device = torch.device("cpu")  # where tensors for this group's backend live

    def global_rank(self, axis_rank: int) -> int:
        return self.ranks[axis_rank]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------
# Raw counted operations (no autograd)
# --------------------------------------------------------------------------------------------

def _all_reduce_(x: torch.Tensor, axis: AxisGroup, op: str) -> torch.Tensor:
    axis.stats.record(axis.name, "all_reduce", _nbytes(x))
    reduce_op = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                 "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(x, op=reduce_op, group=axis.group)
    if op == "avg":
        x.div_(axis.size)
    return x


def _all_gather(x: torch.Tensor, axis: AxisGroup, dim: int) -> torch.Tensor:
    axis.stats.record(axis.name, "all_gather", _nbytes(x))
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(parts, x, group=axis.group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, axis: AxisGroup, dim: int) -> torch.Tensor:
    if x.shape[dim] % axis.size:
        raise ValueError(f"reduce_scatter over '{axis.name}': dim {dim} of size {x.shape[dim]} "
                         f"does not split into {axis.size} equal parts")
    axis.stats.record(axis.name, "reduce_scatter", _nbytes(x))
    parts = [p.contiguous() for p in x.chunk(axis.size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=axis.group)
    return out


def _all_to_all(x: torch.Tensor, axis: AxisGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    if x.shape[scatter_dim] % axis.size:
        raise ValueError(f"all_to_all over '{axis.name}': dim {scatter_dim} of size "
                         f"{x.shape[scatter_dim]} does not split into {axis.size} equal parts")
    axis.stats.record(axis.name, "all_to_all", _nbytes(x))
    send = [p.contiguous() for p in x.chunk(axis.size, dim=scatter_dim)]
    recv = [torch.empty_like(send[0]) for _ in range(axis.size)]
    dist.all_to_all(recv, send, group=axis.group)
    return torch.cat(recv, dim=gather_dim)


def _broadcast_(x: torch.Tensor, axis: AxisGroup, src: int) -> torch.Tensor:
    axis.stats.record(axis.name, "broadcast", _nbytes(x))
    dist.broadcast(x, src=axis.global_rank(src), group=axis.group)
    return x


def _reduce_(x: torch.Tensor, axis: AxisGroup, dst: int) -> torch.Tensor:
    axis.stats.record(axis.name, "reduce", _nbytes(x))
    dist.reduce(x, dst=axis.global_rank(dst), op=dist.ReduceOp.SUM, group=axis.group)
    return x


_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into(out: torch.Tensor, shard: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    """Every rank's `shard`, concatenated in rank order, into the flat `out` (no autograd)."""
    axis.stats.record(axis.name, "all_gather", _nbytes(shard))
    _gather_single(out, shard.contiguous(), group=axis.group)
    return out


def reduce_scatter_into(out: torch.Tensor, full: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    """This rank's part of the sum of every rank's flat `full` (no autograd)."""
    axis.stats.record(axis.name, "reduce_scatter", _nbytes(full))
    _scatter_single(out, full.contiguous(), group=axis.group)
    return out


def all_reduce_(x: torch.Tensor, axis: AxisGroup, op: str = "sum") -> torch.Tensor:
    """In-place counted all-reduce (no autograd)."""
    return _all_reduce_(x, axis, op)


def broadcast_(x: torch.Tensor, axis: AxisGroup, src: int = 0) -> torch.Tensor:
    """In-place counted broadcast from the axis rank `src` (no autograd)."""
    return _broadcast_(x, axis, src)


# --------------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------------

class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, op):
        ctx.axis, ctx.op = axis, op
        return _all_reduce_(x.clone(), axis, op)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce_(g.clone(), ctx.axis, ctx.op), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return _all_gather(x, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, ctx.axis, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return _reduce_scatter(x, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.axis, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, scatter_dim, gather_dim):
        ctx.axis, ctx.dims = axis, (scatter_dim, gather_dim)
        return _all_to_all(x, axis, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(g, ctx.axis, gather_dim, scatter_dim), None, None, None


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, src):
        ctx.axis, ctx.src = axis, src
        return _broadcast_(x.clone(), axis, src)

    @staticmethod
    def backward(ctx, g):
        total = _reduce_(g.clone(), ctx.axis, ctx.src)
        return (total if ctx.axis.rank == ctx.src else torch.zeros_like(g)), None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def all_reduce(x: torch.Tensor, axis: AxisGroup, op: str = "sum") -> torch.Tensor:
    """Sum (or avg, max, min) of `x` over the axis, on every rank. Out of place."""
    if axis.size == 1:
        return x
    if op in ("max", "min"):
        return _all_reduce_(x.detach().clone(), axis, op)
    return _AllReduce.apply(x, axis, op)


def all_gather(x: torch.Tensor, axis: AxisGroup, dim: int = 0) -> torch.Tensor:
    """Every rank's `x`, concatenated along `dim` in axis order."""
    if axis.size == 1:
        return x
    return _AllGather.apply(x, axis, dim)


def reduce_scatter(x: torch.Tensor, axis: AxisGroup, dim: int = 0) -> torch.Tensor:
    """Sum over the axis, of which this rank keeps part `axis.rank` of `dim`."""
    if axis.size == 1:
        return x
    return _ReduceScatter.apply(x, axis, dim)


def all_to_all(x: torch.Tensor, axis: AxisGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` along `scatter_dim`, send part j to rank j, concatenate what arrives along
    `gather_dim` (the switch of a split axis used by sequence and axial parallelism)."""
    if axis.size == 1:
        return x
    return _AllToAll.apply(x, axis, scatter_dim, gather_dim)


def broadcast(x: torch.Tensor, axis: AxisGroup, src: int = 0) -> torch.Tensor:
    """The `x` of axis rank `src`, on every rank. Out of place."""
    if axis.size == 1:
        return x
    return _Broadcast.apply(x, axis, src)


def send(x: torch.Tensor, axis: AxisGroup, dst: int) -> None:
    """Send `x` to axis rank `dst` (blocking)."""
    axis.stats.record(axis.name, "send", _nbytes(x))
    dist.send(x.contiguous(), dst=axis.global_rank(dst), group=axis.group)


def recv(buffer: torch.Tensor, axis: AxisGroup, src: int) -> torch.Tensor:
    """Fill `buffer` with what axis rank `src` sends (blocking); returns the buffer."""
    axis.stats.record(axis.name, "recv", _nbytes(buffer))
    dist.recv(buffer, src=axis.global_rank(src), group=axis.group)
    return buffer


def isend(x: torch.Tensor, axis: AxisGroup, dst: int, tag: int = 0) -> dist.Work:
    """Start sending `x` (contiguous) to axis rank `dst`; wait on the returned work before
    changing or freeing `x`. A receive matches the send with the same source and `tag`."""
    if not x.is_contiguous():
        raise ValueError("isend needs a contiguous tensor that lives until the send completes")
    axis.stats.record(axis.name, "send", _nbytes(x))
    return dist.isend(x, dst=axis.global_rank(dst), group=axis.group, tag=tag)


def irecv(buffer: torch.Tensor, axis: AxisGroup, src: int, tag: int = 0) -> dist.Work:
    """Start receiving into `buffer` from axis rank `src`."""
    axis.stats.record(axis.name, "recv", _nbytes(buffer))
    return dist.irecv(buffer, src=axis.global_rank(src), group=axis.group, tag=tag)


def barrier(axis: AxisGroup) -> None:
    if axis.size > 1:
        dist.barrier(group=axis.group)
