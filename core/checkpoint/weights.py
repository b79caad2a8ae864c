"""`model.safetensors`: the whole model's weights in one file, whatever layout wrote them.

The file is the state dict of the plain model: every parameter at its unsplit shape under its
name, and the persistent buffers, so safetensors alone loads it into the plain model. A tensor
the model holds under several names (tied weights: GPT's token embedding and classifier) is
stored once, under the first of its names in sorted order, and the file's metadata maps each
other name to that one (as `safetensors.torch.save_model` writes it). Reading fills the other
names back in and checks the names against the model before anything is loaded.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from pathlib import Path

import torch
from safetensors.torch import save_file as st_save_file
from torch import nn

from core.errors import LoomError

Ties = list[tuple[str, ...]]


def tied_names(model: nn.Module) -> Ties:
    """The names of each tensor (parameter or buffer) that `model` holds under more than one."""
    names = defaultdict(list)
    for name, t in chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)):
        names[id(t)].append(name)
    return [tuple(sorted(group)) for group in names.values() if len(group) > 1]


def merge_ties(groups: Ties) -> Ties:
    """Groups that share a name are one tensor."""
    merged: list[set[str]] = []
    for group in map(set, groups):
        for other in [m for m in merged if m & group]:
            merged.remove(other)
            group |= other
        merged.append(group)
    return [tuple(sorted(g)) for g in merged]


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that the model's state dict holds, by every name."""
    saved = model.state_dict().keys()       # references only: nothing is copied
    return {n: b for n, b in model.named_buffers(remove_duplicate=False) if n in saved}


def write_weights(path: Path, tensors: dict[str, torch.Tensor], ties: Ties) -> None:
    """Write unsplit `tensors` (any one name of each tied tensor will do) as the weights file."""
    out = dict(tensors)
    metadata: dict[str, str] = {}
    for group in ties:
        present = [n for n in group if n in out]
        if not present:
            continue
        keep = group[0]
        value = out.get(keep, out[present[0]])
        for n in present:
            del out[n]
        out[keep] = value
        metadata.update({n: keep for n in group[1:]})
    st_save_file({k: v.detach().contiguous() for k, v in out.items()}, str(path), metadata=metadata or None)


def fit_weights(saved: dict[str, torch.Tensor], model: nn.Module, ties: Ties, path: Path,
                whole: bool = True) -> dict[str, torch.Tensor]:
    """`saved` with every name of a tied tensor filled in, once the model's parameters and
    persistent buffers are all there; names the model lacks are refused too when `model` is the
    whole model (a pipeline stage holds only its own part)."""
    weights = dict(saved)
    for group in ties:
        have = next((n for n in group if n in saved), None)
        if have is not None:
            weights.update({n: saved[have] for n in group if n not in saved})
    wanted = [n for n, _ in model.named_parameters(remove_duplicate=False)] + list(persistent_buffers(model))
    missing = sorted(n for n in wanted if n not in weights)
    known = set(wanted) | {n for n, _ in model.named_buffers(remove_duplicate=False)}   # older files hold every buffer
    unexpected = sorted(set(saved) - known) if whole else []
    if missing or unexpected:
        raise LoomError(f"weights in {path} do not fit this model: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}; was it saved with another model.* recipe?")
    return weights


def check_shape(name: str, value: torch.Tensor, shape: torch.Size) -> None:
    if tuple(value.shape) != tuple(shape):
        raise RuntimeError(f"{name} is {tuple(value.shape)} in the file and {tuple(shape)} in the model")


@torch.no_grad()
def load_buffers(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for name, buf in persistent_buffers(model).items():
        check_shape(name, weights[name], buf.shape)
        buf.copy_(weights[name])
