"""Tensor-parallel layers: the one API models use. A layer holds this rank's parts of its
parameters and asks its mode (`core.tensor.modes`) to compute; the same model code runs in any
mode and any size, and `serial_state_dict` / `load_serial_state_dict` move weights to and from
the unsplit layout.

Every parameter of these layers carries `tp_replicas`: how many ranks of the tensor-parallel
group hold the same values (1 = each holds a different part; the group size = replicated), which
is all that gradient norms need to count each value once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.tensor.modes import COLUMN, EMBEDDING, FEATURES, ROW, ParamKind, TPMode


class TPLayer(nn.Module):
    """A module whose parameters `tp_kinds` names are split by its mode; `serial_shapes` holds
    their unsplit shapes."""

    mode: TPMode

    def _register(self, name: str, serial: torch.Tensor | None, kind: ParamKind) -> None:
        if serial is None:
            self.register_parameter(name, None)
            return
        if not hasattr(self, "tp_kinds"):
            self.tp_kinds, self.serial_shapes = {}, {}
        self.tp_kinds[name], self.serial_shapes[name] = kind, tuple(serial.shape)
        p = nn.Parameter(self.mode.shard(kind, serial))
        p.tp_replicas = self.mode.replicas(kind, tuple(serial.shape))
        setattr(self, name, p)

    def shard(self, name: str, serial: torch.Tensor) -> torch.Tensor:
        return self.mode.shard(self.tp_kinds[name], serial)

    @torch.no_grad()
    def load_serial(self, **serial: torch.Tensor) -> None:
        for name, value in serial.items():
            getattr(self, name).copy_(self.shard(name, value))

    @torch.no_grad()
    def serial_state(self) -> dict[str, torch.Tensor]:
        return {name: self.mode.gather(kind, getattr(self, name).detach(), self.serial_shapes[name])
                for name, kind in self.tp_kinds.items() if getattr(self, name) is not None}


class Linear(TPLayer):
    """`role` places the layer in a pair: `column` first (qkv, fc, the classifier), `row` second
    (the projections back to the model width). `groups`: the output features are that many
    stacked blocks split on their own (attention's q, k, v)."""

    def __init__(self, in_features: int, out_features: int, mode: TPMode, bias: bool = True,
                 role: str = COLUMN, groups: int = 1) -> None:
        super().__init__()
        if role not in (COLUMN, ROW):
            raise ValueError(f"role must be {COLUMN!r} or {ROW!r}, got {role!r}")
        self.mode, self.role, self.groups = mode, role, groups
        self.in_features, self.out_features = in_features, out_features
        serial = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(serial, a=math.sqrt(5))       # torch's nn.Linear default
        serial_b = None
        if bias:
            bound = 1 / math.sqrt(in_features)
            serial_b = torch.empty(out_features).uniform_(-bound, bound)
        self._register("weight", serial, ParamKind("weight", role, groups))
        self._register("bias", serial_b, ParamKind("bias", role, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mode.linear(x, self.weight, self.bias, self.role)


class Embedding(TPLayer):
    """Vocabulary embedding, laid out as the weight of a column Linear from the model width to the
    vocabulary (so a tied classifier shares it in every mode); its output is the residual stream."""

    def __init__(self, num_embeddings: int, embedding_dim: int, mode: TPMode) -> None:
        super().__init__()
        self.mode = mode
        self._register("weight", torch.randn(num_embeddings, embedding_dim), EMBEDDING)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mode.embedding(ids, self.weight)


class PositionEmbedding(TPLayer):
    """A learned table of per-position vectors, split by features like the residual stream."""

    def __init__(self, num_positions: int, embedding_dim: int, mode: TPMode) -> None:
        super().__init__()
        self.mode = mode
        self._register("weight", torch.randn(num_positions, embedding_dim), FEATURES)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions, self.mode.features(self.weight))


class LayerNorm(TPLayer):
    """LayerNorm over the model width of the residual stream, wherever its features live."""

    def __init__(self, width: int, mode: TPMode, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.mode, self.eps = mode, eps
        self._register("weight", torch.ones(width), FEATURES)
        self._register("bias", torch.zeros(width) if bias else None, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mode.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(TPLayer):
    """RMSNorm over the model width of the residual stream (no centring, no bias), wherever its
    features live."""

    def __init__(self, width: int, mode: TPMode, eps: float = 1e-6) -> None:
        super().__init__()
        self.mode, self.eps = mode, eps
        self._register("weight", torch.ones(width), FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mode.rms_norm(x, self.weight, self.eps)


class Dropout(nn.Module):
    """Dropout that draws its own random numbers on each rank where the activation is split
    (`split=True`, or every activation of a mode that splits them all) and the same numbers on
    every rank where it is replicated, so replicas stay equal."""

    def __init__(self, p: float, mode: TPMode, split: bool = False) -> None:
        super().__init__()
        self.p, self.mode = p, mode
        self.split = split or mode.split_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.split:
            with self.mode.split_rng():
                return F.dropout(x, self.p, True)
        return F.dropout(x, self.p, True)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, mode: TPMode) -> torch.Tensor:
    """Mean cross-entropy of the vocabulary-split logits of a column Linear (never gathered)."""
    return mode.cross_entropy(logits, target)


@torch.no_grad()
def serial_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsplit state dict of a model built on these layers (every tensor-parallel rank takes
    part; each gets it all). Tied parameters appear under each of their names."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, TPLayer):
            out.update({prefix + k: v for k, v in module.serial_state().items()})
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
        for pname, p in module.named_parameters(recurse=False):
            if prefix + pname not in state:
                missing.append(prefix + pname)
            elif isinstance(module, TPLayer):
                module.load_serial(**{pname: state[prefix + pname]})
            else:
                p.copy_(state[prefix + pname])
    return missing
