"""LARS: SGD with momentum and a layer-wise learning rate, for training with very large batches.

You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", arXiv:1708.03888,
Algorithm 1. The step of one tensor, once the norms are known, is `lars_apply`: the same
function steps the slices of chunk shards in `core.zero`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from core.optim.lamb import NormReducer, layer_norms


def lars_scale(w_norm: Tensor, g_norm: Tensor, group: dict) -> Tensor | float:
    """The multiplier of (g + weight_decay·w) before momentum: lr·eta·|w| / (|g| + weight_decay·|w| + eps)
    for adapted groups (lr alone where |w| or the denominator is 0), lr for adapt=False groups."""
    if not group["adapt"]:
        return group["lr"]
    denominator = g_norm + group["weight_decay"] * w_norm + group["eps"]
    ok = (w_norm > 0) & (denominator > 0)
    local_lr = torch.where(ok, group["trust_coefficient"] * w_norm / denominator, torch.ones_like(w_norm))
    return local_lr * group["lr"]


def lars_apply(w: Tensor, g: Tensor, buf: Tensor, w_norm: Tensor, g_norm: Tensor, group: dict) -> None:
    """One LARS step of one tensor, in place: buf = momentum·buf + lr·local_lr·(g + weight_decay·w),
    then w = w - buf."""
    wd = group["weight_decay"]
    direction = g.add(w, alpha=wd) if wd != 0.0 else g.clone()
    scale = lars_scale(w_norm, g_norm, group)
    direction.mul_(scale.to(w.device) if isinstance(scale, Tensor) else scale)   # 0-dim: no host sync
    buf.mul_(group["momentum"]).add_(direction)
    w.sub_(buf)


class LARS(torch.optim.Optimizer):
    """LARS (arXiv:1708.03888, Algorithm 1), one local learning rate per parameter tensor.

    For each parameter w with gradient g (weight_decay is the group's; it is added to the
    gradient, not decoupled):

        local_lr = trust_coefficient·|w| / (|g| + weight_decay·|w| + eps),
                   or 1 if |w| = 0 or the denominator is 0
        v = momentum·v + lr·local_lr·(g + weight_decay·w)       (v starts at 0)
        w = w - v

    A param group with `adapt=False` (biases and norm gains; the factory puts them in the
    weight_decay=0 group) takes local_lr = 1: plain SGD with momentum.

    The norm hook works as LAMB's (see `LAMB` and `core.optim.lamb.layer_norms`), with the
    gradients in the second half of the vector: [|w_0|², ..., |w_{n-1}|², |g_0|², ..., |g_{n-1}|²].
    """

    def __init__(self, params: Iterable, lr: float = 1e-1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, eps: float = 1e-8, adapt: bool = True,
                 norm_reducer: NormReducer | None = None) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay),
                            ("trust_coefficient", trust_coefficient), ("eps", eps)):
            if value < 0.0:
                raise ValueError(f"LARS: {name}={value}; allowed: >= 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, adapt=adapt)
        super().__init__(params, defaults)
        self.norm_reducer = norm_reducer

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped: list[tuple[Tensor, dict]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                stepped.append((p, group))
        if not stepped:
            return loss
        w_norms, g_norms = layer_norms([p for p, _ in stepped], [p.grad for p, _ in stepped], self.norm_reducer)
        for (p, group), w_norm, g_norm in zip(stepped, w_norms, g_norms):
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            lars_apply(p, p.grad, state["momentum_buffer"], w_norm, g_norm, group)
        return loss
