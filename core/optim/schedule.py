"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from core.config import TrainConfig


@dataclass
class LRShape:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based).

    Warm-up rises linearly and reaches 1 at step `warmup`; decay then falls to `min_ratio`
    at step `total` and stays there.
    """

    total: int
    warmup: int = 0
    kind: str = "cosine"
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    shape = LRShape(total=cfg.steps, warmup=cfg.warmup_steps, kind=cfg.lr_schedule,
                    min_ratio=cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
