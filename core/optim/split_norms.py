"""Per-tensor norms of parameters that are split across ranks, for LAMB and LARS.

Both optimizers put every squared norm of a step into one vector (`core.optim.lamb.layer_norms`:
[|w_0|^2 .. |w_n-1|^2, |x_0|^2 .. |x_n-1|^2], the parameters in the optimizer's order) and pass it
through their `norm_reducer`. `tensor_parallel_reducer` makes that vector the unsplit model's:
each rank's entry is its part's sum of squares, divided by how many ranks of the tensor-parallel
group hold that same part, and one all-reduce over the group adds the parts (the counting of
`core.optim.norms`).
"""

from __future__ import annotations

from typing import Callable

import torch

from core.distributed.comm import AxisGroup
from core.optim.norms import replicas, sum_over


def tensor_parallel_reducer(optimizer: torch.optim.Optimizer, axis: AxisGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reducer for `optimizer`'s parameters split over `axis`. Every parameter must have a
    gradient at each step (the vector's order is the optimizer's order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    weights = torch.tensor([1.0 / replicas(p, axis) for p in params], dtype=torch.float64)

    def reduce(squares: torch.Tensor) -> torch.Tensor:
        if squares.numel() != 2 * len(params):
            raise RuntimeError(f"LAMB/LARS under tensor parallelism: {squares.numel() // 2} parameters had gradients "
                               f"this step, not all {len(params)}; every parameter must take part in every step")
        scale = weights.to(squares.device, squares.dtype).repeat(2)
        return sum_over(squares * scale, (axis,))

    return reduce


def attach(optimizer: torch.optim.Optimizer, tp_axis: AxisGroup | None) -> None:
    """Give a LAMB/LARS optimizer the reducer its split parameters need (nothing to do for other
    optimizers or without tensor parallelism)."""
    if tp_axis is not None and tp_axis.size > 1 and hasattr(optimizer, "norm_reducer"):
        optimizer.norm_reducer = tensor_parallel_reducer(optimizer, tp_axis)
