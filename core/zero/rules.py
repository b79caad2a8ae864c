"""The update rules of the chunk optimizer, one per torch optimizer it can stand in for.

Each steps one slice of a chunk shard (master weights w, gradient g, the two state slots m and v)
with the very function its torch optimizer applies to whole tensors (`core.optim`), so the math
exists once. AdamW takes one pass, chunk by chunk (so it can run inside backward). LAMB and LARS
need every parameter's norms, over all its slices and ranks, before any update: a pass that
returns the tensor whose norm goes with w's (`partner`), then, once the norms are known, `apply`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.optim.cpu_adam import adam_update
from core.optim.lamb import LAMB, lamb_apply, lamb_direction, lamb_partner
from core.optim.lars import LARS, lars_apply


class Rule:
    name = "rule"
    needs_norms = False     # True: two passes around the parameters' norms (partner, apply)

    def update(self, w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, group: dict,
               work: Tensor | None, grad_scale: float) -> None:
        raise NotImplementedError(f"{self.name} steps in two passes")

    def partner(self, w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, group: dict) -> Tensor:
        raise NotImplementedError(f"{self.name} steps in one pass")

    def apply(self, w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: int, group: dict,
              w_norm: Tensor, x_norm: Tensor) -> None:
        raise NotImplementedError(f"{self.name} steps in one pass")


class AdamW(Rule):
    name = "adamw"

    def update(self, w, g, m, v, step, group, work, grad_scale):
        adam_update(w, g, m, v, step, group, work, grad_scale)


class Lamb(Rule):
    name, needs_norms = "lamb", True

    def partner(self, w, g, m, v, step, group):
        return lamb_partner(w, g, m, v, step, group)

    def apply(self, w, g, m, v, step, group, w_norm, x_norm):
        # u again from the moments: keeping it from the first pass would hold a copy of the model
        lamb_apply(w, lamb_direction(m, v, w, step, group), w_norm, x_norm, group)


class Lars(Rule):
    name, needs_norms = "lars", True

    def partner(self, w, g, m, v, step, group):
        return g

    def apply(self, w, g, m, v, step, group, w_norm, x_norm):
        lars_apply(w, g, m, w_norm, x_norm, group)      # the momentum buffer lives in the exp_avg slot


def rule_for(optimizer: torch.optim.Optimizer) -> Rule | None:
    """The rule of `optimizer`: LAMB, LARS, or AdamW for an Adam-like one (its groups have betas:
    torch's AdamW, CPUAdam); None for any other."""
    if isinstance(optimizer, LAMB):
        return Lamb()
    if isinstance(optimizer, LARS):
        return Lars()
    if all("betas" in g for g in optimizer.param_groups):
        return AdamW()
    return None
