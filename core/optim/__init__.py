"""Optimizers and learning-rate schedules built from the recipe's `optim` and `train` sections."""

from core.optim.factory import build_optimizer, param_groups
from core.optim.cpu_adam import CPUAdam
from core.optim.lamb import LAMB
from core.optim.lars import LARS
from core.optim.schedule import LRShape, build_scheduler

__all__ = ["CPUAdam", "LAMB", "LARS", "LRShape", "build_optimizer", "build_scheduler", "param_groups"]
