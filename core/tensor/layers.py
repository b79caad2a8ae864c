"""Tensor-parallel layers: the one API models use. A layer holds this rank's parts of its
parameters and asks its mode (`core.tensor.modes`) to compute; the same model code runs in any
mode and any size, and `load_serial` / `serial_state` move weights to and from the unsplit
layout."""

from __future__ import annotations

import math

import torch
from torch import nn

from core.tensor.modes import COLUMN, ROW, TPMode


class Linear(nn.Module):
    """`role` places the layer in a pair for the 1D mode: `column` first (qkv, fc), `row` second
    (the projections back to the model width)."""

    def __init__(self, in_features: int, out_features: int, mode: TPMode, bias: bool = True,
                 role: str = COLUMN, gather_output: bool = False, groups: int = 1) -> None:
        super().__init__()
        if role not in (COLUMN, ROW):
            raise ValueError(f"role must be {COLUMN!r} or {ROW!r}, got {role!r}")
        self.mode, self.role, self.gather_output, self.groups = mode, role, gather_output, groups
        self.in_features, self.out_features = in_features, out_features
        serial = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(serial, a=math.sqrt(5))       # torch's nn.Linear default
        serial_b = None
        if bias:
            bound = 1 / math.sqrt(in_features)
            serial_b = torch.empty(out_features).uniform_(-bound, bound)
        w, b = mode.shard_linear(serial, serial_b, role, groups)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b) if b is not None else None
        self.weight.tp_split = mode.size > 1                          # each rank holds a different part
        if self.bias is not None:
            self.bias.tp_split = mode.size > 1 and role == COLUMN     # a row layer's bias is whole everywhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mode.linear(x, self.weight, self.bias, self.role, self.gather_output)

    @torch.no_grad()
    def load_serial(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w, b = self.mode.shard_linear(weight, bias, self.role, self.groups)
        self.weight.copy_(w)
        if self.bias is not None:
            self.bias.copy_(b)

    @torch.no_grad()
    def serial_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.mode.gather_linear(self.weight.detach(), None if self.bias is None else self.bias.detach(),
                                       self.role, self.groups)


class Embedding(nn.Module):
    """Vocabulary-parallel embedding: each rank holds vocab / tp rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: TPMode) -> None:
        super().__init__()
        self.mode = mode
        self.weight = nn.Parameter(mode.shard_embedding(torch.randn(num_embeddings, embedding_dim)))
        self.weight.tp_split = mode.size > 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mode.embedding(ids, self.weight)

    @torch.no_grad()
    def load_serial(self, weight: torch.Tensor) -> None:
        self.weight.copy_(self.mode.shard_embedding(weight))

    @torch.no_grad()
    def serial_state(self) -> torch.Tensor:
        return self.mode.gather_embedding(self.weight.detach())


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, mode: TPMode) -> torch.Tensor:
    """Mean cross-entropy of vocabulary-split logits (never gathered)."""
    return mode.cross_entropy(logits, target)


@torch.no_grad()
def serial_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsplit state dict of a model built on these layers (every tensor-parallel rank takes
    part; each gets it all). Tied parameters appear under each of their names."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Linear):
            w, b = module.serial_state()
            out[prefix + "weight"] = w
            if b is not None:
                out[prefix + "bias"] = b
        elif isinstance(module, Embedding):
            out[prefix + "weight"] = module.serial_state()
        else:
            for pname, p in module.named_parameters(recurse=False):
                out[prefix + pname] = p.detach().clone()
    return out


@torch.no_grad()
def load_serial_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Take this rank's parts of an unsplit state dict; returns the names it lacked (a tied
    parameter may be stored under one of its names only)."""
    missing = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, Linear):
            if prefix + "weight" not in state:
                missing.append(prefix + "weight")
                continue
            module.load_serial(state[prefix + "weight"], state.get(prefix + "bias"))
        elif isinstance(module, Embedding):
            if prefix + "weight" not in state:
                missing.append(prefix + "weight")
                continue
            module.load_serial(state[prefix + "weight"])
        else:
            for pname, p in module.named_parameters(recurse=False):
                if prefix + pname in state:
                    p.copy_(state[prefix + pname])
                else:
                    missing.append(prefix + pname)
    return missing


def grad_norm_sq(parameters, axis) -> torch.Tensor:
    """Squared norm of the whole (unsplit) gradient: split parameters' parts summed over the
    tensor-parallel axis (one all-reduce), whole ones counted once."""
    from core.distributed.comm import all_reduce_

    split = torch.zeros((), dtype=torch.float64)
    whole = torch.zeros((), dtype=torch.float64)
    for p in parameters:
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if getattr(p, "tp_split", False):
            split += sq
        else:
            whole += sq
    if axis.size > 1:
        all_reduce_(split, axis, "sum")
    return split + whole
