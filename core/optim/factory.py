"""The optimizer named by `optim.name`, with weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

from core.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices and embeddings decay; biases and norm gains (1-D) do not.

    Tied parameters appear once.
    """
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields each shared tensor once
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name in ("cpu_adam", "hybrid_adam"):       # hybrid_adam: its name before Loom 0.2
        from core.optim.cpu_adam import CPUAdam

        return CPUAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.name in ("lamb", "lars"):
        for group in groups[1:]:  # biases and norm gains: no trust ratio (common practice)
            group["adapt"] = False
        if cfg.name == "lamb":
            from core.optim.lamb import LAMB

            return LAMB(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                        bias_correction=cfg.bias_correction, max_trust=cfg.trust_clamp or None)
        from core.optim.lars import LARS

        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient, eps=cfg.eps)
    raise ValueError(f"optim.name={cfg.name!r} has no builder")  # the schema's choices prevent this
