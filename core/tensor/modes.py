"""Tensor-parallel modes as strategies: each owns how weights and activations are split over the
tensor-parallel ranks and what it communicates; the layers (`core.tensor.layers`) only ask it.

A mode answers, for each layer kind:

- `shard_*`: this rank's part of a serial (unsplit) parameter, and `gather_*`: the serial
  parameter back from every rank's part (checkpoints move between layouts this way);
- the forward computation on this rank's parts, with the communication the mode's design
  prescribes (autograd gives the backward its adjoint communication).

Only the 1D mode (Megatron-LM: column- and row-parallel pairs) exists so far; 2D (Optimus),
2.5D (Tesseract) and 3D are the next strategies behind the same questions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from core.distributed import ParallelMesh
from core.distributed.comm import AxisGroup, _all_gather, all_reduce_
from core.tensor.functional import copy_to, gather_from, reduce_from, scatter_to

COLUMN, ROW = "column", "row"


class TPMode(ABC):
    name = "mode"

    def __init__(self, axis: AxisGroup) -> None:
        self.axis = axis
        self.size = axis.size
        self.rank = axis.rank

    @classmethod
    def serial(cls) -> "TPMode":
        """The mode on one rank: every layer computes exactly what its torch.nn counterpart does."""
        return cls(AxisGroup("tp", 1, 0, (0,)))

    # Linear: weight (out, in) as torch stores it; role says which side of a pair it is
    @abstractmethod
    def shard_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, role: str, groups: int = 1): ...

    @abstractmethod
    def gather_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, role: str, groups: int = 1): ...

    @abstractmethod
    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, role: str,
               gather_output: bool = False) -> torch.Tensor: ...

    # Embedding (vocab, dim)
    @abstractmethod
    def shard_embedding(self, weight: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def gather_embedding(self, weight: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def embedding(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor: ...

    # the loss over vocabulary-split logits
    @abstractmethod
    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


def _part(t: torch.Tensor, parts: int, index: int, dim: int) -> torch.Tensor:
    if t.shape[dim] % parts:
        raise ValueError(f"a dimension of {t.shape[dim]} does not split into {parts} tensor-parallel parts")
    return t.chunk(parts, dim=dim)[index].clone()


class OneD(TPMode):
    """Megatron-LM (Shoeybi et al. 2019). A column-parallel Linear splits its output features
    (input replicated; identity forward, all-reduce of the input gradient backward); a
    row-parallel Linear splits its input features and all-reduces its output in forward. A
    column/row pair (attention's qkv/proj, the MLP's fc/proj) costs one all-reduce forward and one
    backward. The embedding and the classifier split the vocabulary."""

    name = "1d"

    def shard_linear(self, weight, bias, role, groups: int = 1):
        """`groups`: the output features are that many stacked blocks (attention's q, k, v), each
        split on its own, so that every rank holds whole heads of each."""
        if role == COLUMN:
            return _grouped_part(weight, self.size, self.rank, groups), (
                None if bias is None else _grouped_part(bias, self.size, self.rank, groups))
        return _part(weight, self.size, self.rank, 1), None if bias is None else bias.clone()

    def gather_linear(self, weight, bias, role, groups: int = 1):
        if self.size == 1:
            return weight, bias
        if role == COLUMN:
            return _grouped_gather(weight, self.axis, groups), (
                None if bias is None else _grouped_gather(bias, self.axis, groups))
        return _all_gather(weight, self.axis, 1), bias

    def linear(self, x, weight, bias, role, gather_output=False):
        if role == COLUMN:
            y = F.linear(copy_to(x, self.axis), weight, bias)
            return gather_from(y, self.axis, -1) if gather_output else y
        y = reduce_from(F.linear(x, weight), self.axis)
        return y if bias is None else y + bias

    def split_features(self, x: torch.Tensor) -> torch.Tensor:
        """A replicated activation's part for a row-parallel layer fed from outside a pair."""
        return scatter_to(x, self.axis, -1)

    def shard_embedding(self, weight):
        return _part(weight, self.size, self.rank, 0)

    def gather_embedding(self, weight):
        return weight if self.size == 1 else _all_gather(weight, self.axis, 0)

    def embedding(self, ids, weight):
        if self.size == 1:
            return F.embedding(ids, weight)
        rows = weight.shape[0]
        lo = self.rank * rows
        outside = (ids < lo) | (ids >= lo + rows)
        local = (ids - lo).masked_fill(outside, 0)
        out = F.embedding(local, weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from(out, self.axis)

    def cross_entropy(self, logits, target):
        if self.size == 1:
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        return _VocabParallelCrossEntropy.apply(logits, target, self)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits split over the vocabulary, without gathering them: three
    all-reduces of one number per token (the maximum, the sum of exponentials, the target's
    logit); the backward is local (softmax minus one-hot on this rank's columns)."""

    @staticmethod
    def forward(ctx, logits, target, mode: OneD):
        axis = mode.axis
        flat = logits.reshape(-1, logits.shape[-1]).float()
        t = target.reshape(-1)
        vocab_local = flat.shape[-1]
        lo = mode.rank * vocab_local
        peak = flat.max(dim=-1).values
        if axis.size > 1:
            all_reduce_(peak, axis, "max")
        shifted = flat - peak.unsqueeze(-1)
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        inside = (t >= lo) & (t < lo + vocab_local)
        local_t = (t - lo).masked_fill(~inside, 0)
        picked = shifted.gather(1, local_t.unsqueeze(1)).squeeze(1).masked_fill(~inside, 0.0)
        if axis.size > 1:
            all_reduce_(total, axis, "sum")
            all_reduce_(picked, axis, "sum")
        loss = total.log() - picked
        softmax = exp / total.unsqueeze(-1)
        ctx.save_for_backward(softmax, local_t, inside)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss.mean()

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, inside = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0])
        grad[rows[inside], local_t[inside]] -= 1.0
        grad *= g / grad.shape[0]
        return grad.view(ctx.shape).to(ctx.dtype), None, None


def _grouped_part(t: torch.Tensor, parts: int, index: int, groups: int) -> torch.Tensor:
    blocks = t.chunk(groups, dim=0)
    return torch.cat([_part(b, parts, index, 0) for b in blocks], dim=0)


def _grouped_gather(t: torch.Tensor, axis, groups: int) -> torch.Tensor:
    every = _all_gather(t, axis, 0).chunk(axis.size, dim=0)           # rank by rank
    per_rank = [r.chunk(groups, dim=0) for r in every]                # each: its part of every group
    return torch.cat([torch.cat([r[g] for r in per_rank], dim=0) for g in range(groups)], dim=0)


MODES = {"1d": OneD}


def make_mode(name: str, mesh: ParallelMesh) -> TPMode:
    from core.errors import LoomError

    if name not in MODES:
        raise LoomError(f"parallel.tp_mode={name} is not available yet; available: {', '.join(MODES)}")
    return MODES[name](mesh.axis("tp"))
