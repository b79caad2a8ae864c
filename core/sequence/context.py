"""What a model needs to run on its part of every sequence."""

from __future__ import annotations

import torch

from core.distributed.comm import AxisGroup, all_reduce_
from core.errors import LoomError

MODES = ("ring", "all_to_all")


class SequenceParallel:
    """Rank r of the `sp` axis holds tokens [r L/p, (r + 1) L/p): `local` takes them from a
    (batch, L, ...) tensor that every rank has whole (the token ids, the targets), `positions`
    gives their global position ids, `attention` runs the chosen attention, and `mean_loss` turns
    this rank's mean over its tokens into the mean over the whole sequence (value on every rank;
    the gradient stays this rank's, and data-parallel averaging over dp x sp completes it)."""

    def __init__(self, axis: AxisGroup, mode: str = "ring") -> None:
        if mode not in MODES:
            raise LoomError(f"parallel.sp_mode={mode} is unknown; choose {' or '.join(MODES)}")
        self.axis, self.mode = axis, mode
        self.size, self.rank = axis.size, axis.rank

    def check(self, seq_len: int, heads: int) -> None:
        """Refuse, before any work, a sequence or head count this split cannot take."""
        if seq_len % self.size:
            raise LoomError(f"model.seq_len={seq_len} does not split into parallel.sp={self.size} equal parts; "
                            f"use a multiple of {self.size}")
        if self.mode == "all_to_all" and heads % self.size:
            raise LoomError(f"parallel.sp_mode=all_to_all needs the attention heads on each rank ({heads}) to divide "
                            f"by parallel.sp={self.size}; use parallel.sp_mode=ring, or a sp that divides {heads}")

    def local(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        if x.shape[dim] % self.size:
            raise LoomError(f"a sequence of {x.shape[dim]} tokens does not split into parallel.sp={self.size} "
                            f"equal parts")
        return x.chunk(self.size, dim=dim)[self.rank]

    def positions(self, length: int, device) -> torch.Tensor:
        part = length // self.size
        return torch.arange(self.rank * part, (self.rank + 1) * part, device=device)

    def attention(self, q, k, v, causal: bool = True) -> torch.Tensor:
        from core.sequence.attention import all_to_all_attention, ring_attention

        fn = ring_attention if self.mode == "ring" else all_to_all_attention
        return fn(q, k, v, self.axis, causal)

    def mean_loss(self, local_mean: torch.Tensor) -> torch.Tensor:
        total = local_mean.detach().clone()
        all_reduce_(total, self.axis, "avg")
        return local_mean + (total - local_mean.detach())
