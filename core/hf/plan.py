"""Parallel plans as data: what each layer of a Hugging Face model is, by its module name.

A plan maps module-name patterns (`*` stands for a layer number) to a role: a column- or
row-split linear, the vocabulary embedding, a table of position vectors, a norm, the attention
module whose heads split, a dropout. `apply_plan` swaps each matched `torch.nn` module for the
`core.tensor` layer that computes the same thing in any tensor-parallel mode (on one process,
exactly what the original computed), and marks each attention module with the mode and the
sequence split, which the attention function registered in `core.hf.attention` reads. Nothing
of the model's forward code is copied or patched: a plan names modules and says what they are.

Weights move between the Hugging Face layout and Loom's through the roles: GPT-2's `Conv1D`
stores its weight as (in, out), Loom's Linear as (out, in); a fused q|k|v projection is a column
Linear with three groups, so each rank takes whole heads of each of q, k and v.

Besides the roles a plan names how the model runs as a sequence of layers (the embeddings, the
decoder blocks, the head), which is how the pipeline cuts it and how `HFCausalLM` runs it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from core.errors import LoomError
from core.sequence import SequenceParallel
from core.tensor import COLUMN, ROW, Dropout, Embedding, LayerNorm, Linear, PositionEmbedding, RMSNorm, TPMode


def _conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (a linear layer whose weight is stored (in, out)), known by its name so that
    no particular transformers version's class has to be imported."""
    return type(module).__name__ == "Conv1D"


def _linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in, out, has bias) of an nn.Linear or a Conv1D."""
    w = module.weight
    in_f, out_f = (w.shape[0], w.shape[1]) if _conv1d(module) else (w.shape[1], w.shape[0])
    return in_f, out_f, getattr(module, "bias", None) is not None


@dataclass(frozen=True)
class Role:
    """What a module is to the plan. `make` returns the module that replaces it (or the module
    itself, changed in place); `to_loom` / `to_hf` convert a parameter's values between the two
    layouts (both serial, unsplit)."""

    def make(self, module: nn.Module, mode: TPMode, seq: SequenceParallel | None) -> nn.Module:
        raise NotImplementedError

    def to_loom(self, pname: str, value: torch.Tensor, module_type: str) -> torch.Tensor:
        return value

    def to_hf(self, pname: str, value: torch.Tensor, module_type: str) -> torch.Tensor:
        return value

    def init_value(self, pname: str) -> float | None:
        """The constant a fresh parameter `pname` starts at (None: drawn at random)."""
        return 0.0 if pname == "bias" else None


@dataclass(frozen=True)
class _LinearRole(Role):
    role = COLUMN
    groups: int = 1

    def make(self, module, mode, seq):
        in_f, out_f, bias = _linear_shape(module)
        new = Linear(in_f, out_f, mode, bias=bias, role=self.role, groups=self.groups)
        new.hf_type = type(module).__name__
        if not module.weight.is_meta:
            values = {"weight": self.to_loom("weight", module.weight.detach(), new.hf_type)}
            if bias:
                values["bias"] = module.bias.detach()
            new.load_serial(**values)
        return new

    def to_loom(self, pname, value, module_type):
        return value.t() if pname == "weight" and module_type == "Conv1D" else value

    def to_hf(self, pname, value, module_type):
        return value.t().contiguous() if pname == "weight" and module_type == "Conv1D" else value


@dataclass(frozen=True)
class Column(_LinearRole):
    """A linear layer whose output features split (q, k, v, the MLP's first layers, the vocabulary
    head); `groups`: the outputs are that many stacked blocks (a fused q|k|v), each split alone."""

    role = COLUMN


@dataclass(frozen=True)
class Row(_LinearRole):
    """A linear layer whose input features split (attention's output projection, the MLP's last);
    its output is summed over the ranks."""

    role = ROW


@dataclass(frozen=True)
class VocabEmbedding(Role):
    """The token embedding: its rows (the vocabulary) split."""

    def make(self, module, mode, seq):
        return _table(Embedding, module, mode)


@dataclass(frozen=True)
class PositionTable(Role):
    """A learned table of position vectors (GPT-2's wpe, OPT's embed_positions), split by features
    like the residual stream. The model's plan passes position ids (with any offset the table has)."""

    def make(self, module, mode, seq):
        return _table(PositionEmbedding, module, mode)


def _table(layer, module: nn.Module, mode: TPMode) -> nn.Module:
    """An nn.Embedding as `layer` (core.tensor's vocabulary or position table), its values moved over."""
    new = layer(module.num_embeddings, module.embedding_dim, mode)
    new.hf_type = type(module).__name__
    if not module.weight.is_meta:
        new.load_serial(weight=module.weight.detach())
    return new


@dataclass(frozen=True)
class Norm(Role):
    """LayerNorm (`rms=False`) or RMSNorm over the residual stream, whose features some modes split.
    The epsilon is read from the module (`eps` or `variance_epsilon`)."""

    rms: bool = False

    def make(self, module, mode, seq):
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
        weight = getattr(module, "weight", None)
        if eps is None or weight is None:
            raise LoomError(f"{type(module).__name__}: a norm without a scale or an epsilon is not in the plan's "
                            f"reach; this model cannot be spread by it")
        width = weight.shape[0]
        if self.rms:
            new = RMSNorm(width, mode, eps)
        else:
            new = LayerNorm(width, mode, bias=getattr(module, "bias", None) is not None, eps=eps)
        new.hf_type = type(module).__name__
        if not weight.is_meta:
            new.load_serial(**{n: p.detach() for n, p in module.named_parameters(recurse=False)})
        return new

    def init_value(self, pname):
        return 1.0 if pname == "weight" else 0.0


@dataclass(frozen=True)
class Heads(Role):
    """The attention module: its heads split over the tensor-parallel ranks. `counts` names its
    attributes that hold a number of heads, `widths` those that hold heads x head size (both become
    this rank's share); the module is marked for `core.hf.attention` (mode, sequence split)."""

    counts: tuple[str, ...] = ()
    widths: tuple[str, ...] = ()

    def make(self, module, mode, seq):
        for attr in self.counts + self.widths:
            whole = getattr(module, attr)
            if whole % mode.head_parts:
                raise LoomError(f"{type(module).__name__}.{attr}={whole} does not split into the {mode.head_parts} "
                                f"parts of the tensor-parallel mode ({mode.describe()})")
            setattr(module, attr, whole // mode.head_parts)
        module.loom_mode, module.loom_sequence = mode, seq
        return module


@dataclass(frozen=True)
class Drop(Role):
    """An nn.Dropout on the residual stream: under modes that split activations, each rank draws its
    own numbers."""

    def make(self, module, mode, seq):
        return Dropout(module.p, mode)


@dataclass(frozen=True)
class ParallelPlan:
    """How one family of causal language models is spread.

    `layers`: module-name pattern -> role. `blocks`: the ModuleList of decoder blocks; `embed_modules`
    / `head_modules`: the modules the first and last pipeline layers own. `embed(model, ids, positions)`,
    `block(model, layer, x, positions)` and `head(model, x)` run the model as a sequence of layers, on
    the swapped modules, by their Hugging Face names. `check(config, mode)` refuses, in one line, a
    configuration of the family the plan does not cover. `dropout_keys`: the config's dropout
    probabilities (split activations need them at zero). `checked_with`: the transformers versions
    the plan was checked with."""

    family: str
    classes: tuple[str, ...]
    checked_with: str
    layers: dict[str, Role]
    blocks: str
    embed_modules: tuple[str, ...]
    head_modules: tuple[str, ...]
    embed: Callable[..., torch.Tensor]
    block: Callable[..., torch.Tensor]
    head: Callable[..., torch.Tensor]
    tied: tuple[str, str] | None = None          # (embedding weight, head weight), where the model ties them
    check: Callable[..., None] = lambda config, mode: None
    dropout_keys: tuple[str, ...] = ()
    heads_key: str = "num_attention_heads"
    kv_heads_key: str = ""
    init_std_keys: tuple[str, ...] = ("initializer_range",)
    optional: tuple[str, ...] = ()               # patterns a configuration of the family may lack

    def role_of(self, module_name: str) -> Role | None:
        for pattern, role in self.layers.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                return role
        return None


def apply_plan(model: nn.Module, plan: ParallelPlan, mode: TPMode, seq: SequenceParallel | None = None,
               only: tuple[type, ...] | None = None) -> nn.Module:
    """Swap `model`'s modules for `core.tensor`'s as `plan` says (in place; returns `model`). Works on
    a model made on the meta device (nothing to convert) and on one with weights (converted and
    split as they move). Every pattern of the plan must match a module: a model whose structure
    moved on (another transformers version) is refused rather than half spread. `only`: the role
    types to apply (the others' modules stay as they are: what 1D leaves replicated)."""
    matched = {pattern: 0 for pattern in plan.layers}
    tied = None
    if plan.tied is not None:
        params = dict(model.named_parameters(remove_duplicate=False))
        embed, head = (params.get(n) for n in plan.tied)
        tied = embed is not None and embed is head
    for name, module in list(model.named_modules()):
        if not name:
            continue
        role = None
        for pattern, r in plan.layers.items():
            if fnmatch.fnmatchcase(name, pattern):
                matched[pattern] += 1
                role = r
                break
        if role is None or (only is not None and not isinstance(role, only)):
            continue
        new = role.make(module, mode, seq)
        if new is not module:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
    missing = [p for p, n in matched.items() if n == 0 and p not in plan.optional]
    if missing:
        raise LoomError(f"{type(model).__name__} has no module matching {', '.join(missing)} of the {plan.family} plan "
                        f"(checked with {plan.checked_with}); this transformers version moved its layers")
    if tied:
        embed, head = (model.get_submodule(n.rpartition(".")[0]) for n in plan.tied)
        head.weight = embed.weight
    return model
