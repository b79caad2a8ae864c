"""The four region operators of tensor parallelism, as autograd functions over counted collectives.

Inside a tensor-parallel group every rank computes the same loss from the same replicated
activations, so a gradient that reaches a replicated tensor is already the full gradient on each
rank. Hence the pairs (Shoeybi et al. 2019, "Megatron-LM", section 3):

    copy_to      forward: identity          backward: all-reduce    (entering a split region)
    reduce_from  forward: all-reduce        backward: identity      (leaving it by a sum)
    gather_from  forward: all-gather(dim)   backward: keep own part (leaving it by concatenation)
    scatter_to   forward: keep own part     backward: all-gather    (entering it by a split)

`core.distributed.all_reduce` is not the same thing: its backward all-reduces too, which is
right when each rank's loss is its own term of a sum, and wrong here.
"""

from __future__ import annotations

import torch

from core.distributed.comm import AxisGroup, _all_gather, all_reduce_


def _own_part(x: torch.Tensor, axis: AxisGroup, dim: int) -> torch.Tensor:
    if x.shape[dim] % axis.size:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split into {axis.size} parts over "
                         f"'{axis.name}'")
    return x.chunk(axis.size, dim=dim)[axis.rank].contiguous()


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce_(g.contiguous().clone(), ctx.axis, "sum"), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        return all_reduce_(x.contiguous().clone(), axis, "sum")

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return _all_gather(x, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return _own_part(g, ctx.axis, ctx.dim), None, None


class _ScatterTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return _own_part(x, axis, dim)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, ctx.axis, ctx.dim), None, None


def copy_to(x: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    return x if axis.size == 1 else _CopyTo.apply(x, axis)


def reduce_from(x: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    return x if axis.size == 1 else _ReduceFrom.apply(x, axis)


def gather_from(x: torch.Tensor, axis: AxisGroup, dim: int = -1) -> torch.Tensor:
    return x if axis.size == 1 else _GatherFrom.apply(x, axis, dim % x.dim())


def scatter_to(x: torch.Tensor, axis: AxisGroup, dim: int = -1) -> torch.Tensor:
    return x if axis.size == 1 else _ScatterTo.apply(x, axis, dim % x.dim())
