"""Data order that depends only on (seed, step): exact resume and data-parallel parity for free.

A global batch of G = micro_batch x grad_accum x dp samples is a slice of one permutation of
the dataset per epoch. Data-parallel rank r takes, for its micro-batch m of a step, the
micro_batch samples at offset (m x dp + r) x micro_batch of that slice. So

- one process with micro_batch x dp samples per micro-batch sees exactly the samples that dp
  ranks see together (the parity tests rely on it), and
- the samples of step k are known from k alone: resuming sets the start step, nothing else.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from core.errors import LoomError


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of indices), step after step.

    With `steps=None` it runs forever (training); with a number it stops after that many steps.
    With `with_epoch=True` each item is an (index, epoch) pair, for datasets whose random
    augmentation must depend on where the sample stands in the stream.
    """

    def __init__(self, length: int, micro_batch: int, grad_accum: int, dp_rank: int, dp_size: int,
                 seed: int = 0, shuffle: bool = True, start_step: int = 0,
                 steps: int | None = None, with_epoch: bool = False) -> None:
        self.length = length
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.start_step = start_step
        self.steps = steps
        self.with_epoch = with_epoch
        self.global_batch = micro_batch * grad_accum * dp_size
        if length < self.global_batch:
            raise LoomError(f"the dataset has {length} samples, fewer than one global batch "
                            f"({self.global_batch} = micro_batch {micro_batch} x grad_accum "
                            f"{grad_accum} x dp {dp_size}); use more data or a smaller batch")
        self.steps_per_epoch = length // self.global_batch

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.length)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.length, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        epoch, order = -1, None
        end = None if self.steps is None else self.start_step + self.steps
        while end is None or step < end:
            e = step // self.steps_per_epoch
            if e != epoch:
                epoch, order = e, self._order(e)
            base = (step % self.steps_per_epoch) * self.global_batch
            for m in range(self.grad_accum):
                start = base + (m * self.dp_size + self.dp_rank) * self.micro_batch
                indices = order[start:start + self.micro_batch].tolist()
                yield [(i, e) for i in indices] if self.with_epoch else indices
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless sampler has no length")
        return self.steps * self.grad_accum
