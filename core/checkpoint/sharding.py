"""What a plugin tells the checkpoint format: how its ranks hold the model's weights.

The format (`core.checkpoint.io`) writes and reads whole, unsplit weights. A `Sharding` turns
this rank's view of the model into unsplit tensors by name (`gather`, a collective) and puts
unsplit tensors back where this rank keeps them (`scatter`), and names the mesh axes whose
ranks hold different optimizer states (`split_by`).

The base class is the common case: every rank holds the model in its own parameters, the layers
of `core.tensor` split over their tensor-parallel group. A plugin that keeps its parameters
elsewhere (in chunks) overrides `local` and `load_local`; one whose ranks hold different parts
of the model (pipeline stages) overrides `gather`.
"""

from __future__ import annotations

import torch
from torch import nn

from core.checkpoint.weights import Ties, check_shape, persistent_buffers, tied_names
from core.tensor import TPLayer


def split_layer(model: nn.Module, name: str) -> tuple[TPLayer, str] | None:
    """The tensor-parallel layer that splits parameter `name`, and the parameter's name in it."""
    module_name, _, pname = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, TPLayer) and pname in module.tp_kinds:
        return module, pname
    return None


def unsplit(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of this rank's parameters by name, at their unsplit shapes: the parts of
    `core.tensor` layers gathered over their tensor-parallel group (a collective: the ranks of
    the group pass the same names in the same order), the others as they are. Each comes back on
    the device it was given on."""
    out = {}
    for name, t in tensors.items():
        split = split_layer(model, name)
        if split is not None and split[0].mode.size > 1:
            layer, pname = split
            device = getattr(layer, pname).device         # where the group communicates
            t = layer.mode.gather(layer.tp_kinds[pname], t.to(device), layer.serial_shapes[pname]).to(t.device)
        out[name] = t
    return out


class SplitDraw:
    """`materialize(name, out)` for a model made on the meta device, from its `init(name, tensor)`:
    a parameter that a tensor-parallel layer splits is drawn whole (the same numbers one process
    draws) and this rank keeps its part, as the layers do when built normally. `as_name` draws
    the values of another name (a tied weight's copy on another pipeline stage, which holds the
    first one's values), still split as `name` is."""

    def __init__(self, model: nn.Module, init) -> None:
        self.model, self.init = model, init

    def __call__(self, name: str, out: torch.Tensor, as_name: str | None = None) -> None:
        draw = as_name or name
        split = split_layer(self.model, name)
        if split is None or split[0].mode.size == 1:
            self.init(draw, out)
            return
        layer, pname = split
        whole = torch.empty(layer.serial_shapes[pname], dtype=out.dtype, device=out.device)
        self.init(draw, whole)
        out.copy_(layer.shard(pname, whole))


def split(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of each of its parameters (by its first name) from unsplit `weights`."""
    out = {}
    for name, p in model.named_parameters():
        value, split = weights[name], split_layer(model, name)
        if split is None:
            check_shape(name, value, p.shape)
            out[name] = value
        else:
            layer, pname = split
            check_shape(name, value, layer.serial_shapes[pname])
            out[name] = layer.shard(pname, value)
    return out


class Sharding:
    """Every rank holds the model in its own parameters; under tensor parallelism (a mesh whose
    tp axis has several ranks) each holds its part, and its optimizer state differs per tp rank."""

    whole = True           # this rank's model has every name of the whole model

    def __init__(self, mesh=None) -> None:
        self.mesh = mesh

    @property
    def split_by(self) -> tuple[str, ...]:
        """The mesh axes whose ranks hold different optimizer states."""
        return ("tp",) if self.mesh is not None and self.mesh.size("tp") > 1 else ()

    def ties(self, model: nn.Module) -> Ties:
        """The names of each tensor of the model held under several."""
        return tied_names(model)

    def local(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """This rank's parameters by name, as it holds them."""
        return {n: p.detach() for n, p in model.named_parameters()}

    @torch.no_grad()
    def load_local(self, model: nn.Module, local: dict[str, torch.Tensor]) -> None:
        """Set this rank's parameters from `local` (by name, shaped as this rank holds them)."""
        for name, p in model.named_parameters():
            p.copy_(local[name])

    def gather(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's parameters, unsplit, and its persistent buffers, by name (any one name of a
        tied tensor). A collective: every rank calls it, and rank 0 of the world gets them all."""
        return {**unsplit(model, self.local(model)), **persistent_buffers(model)}

    def scatter(self, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        """Take this rank's part of every parameter from unsplit `weights` (which hold every name
        of this rank's parameters)."""
        self.load_local(model, split(model, weights))
