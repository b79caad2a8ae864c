"""The region operators of 1D tensor parallelism, as autograd functions over counted collectives.

Where every rank of a tensor-parallel group computes the same thing from the same replicated
activation, the gradient that reaches it is already whole on each rank; where ranks use one
tensor for different parts of the work, each holds only its share. Hence (Shoeybi et al. 2019,
"Megatron-LM", section 3):

    copy_to      forward: identity     backward: all-reduce   (a tensor entering work split over ranks;
                                                               also a parameter replicated over ranks
                                                               that use it on different tokens)
    reduce_from  forward: all-reduce   backward: identity     (partial results summed into a
                                                               replicated tensor used alike by all)
    gather_from  forward: all-gather   backward: this rank's  (a split output made whole for work
                 of the last dim        part of the gradient   every rank does alike: logits for a
                                                               loss the model's own code computes)

`core.distributed.all_reduce` differs from `reduce_from`: its backward all-reduces too, which is
right when the ranks go on to use the sum for different work (split LayerNorm statistics).
"""

from __future__ import annotations

import torch

from core.distributed.comm import AxisGroup, _all_gather, all_reduce_


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


def copy_to(x: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    return x if axis.size == 1 else _CopyTo.apply(x, axis)


def reduce_from(x: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    return x if axis.size == 1 else _ReduceFrom.apply(x, axis)


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return _all_gather(x.contiguous(), axis, x.dim() - 1)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.axis.size, dim=-1)[ctx.axis.rank].contiguous(), None


def gather_from(x: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    return x if axis.size == 1 else _GatherFrom.apply(x, axis)
