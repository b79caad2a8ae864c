"""Gradient shards: a chunk's gradient, reduced over the data-parallel ranks, kept where the
optimizer states are.

When every parameter of a chunk has its gradient, `reduce` turns the chunk's full fp32 gradient
buffer into this rank's shard of the data-parallel mean: stage 1 all-reduces the buffer and
keeps its shard, stages 2 and 3 reduce-scatter it (each rank receives only its shard: half the
traffic of an all-reduce and 1/world of the memory). The shard is added to what earlier
micro-batches of the same step left (gradient accumulation) and written to the store (device,
host or NVMe). Its share of the squared gradient norm is kept per chunk (`core.optim.norms`: under
tensor parallelism each parameter's slice divided by the tp ranks that hold the same values), so
the global gradient norm (clipping, fp16 overflow) needs no second pass over gradients that may
be on disk.
"""

from __future__ import annotations

import math
from concurrent.futures import Future

import torch

from core.distributed.comm import AxisGroup, all_reduce_, reduce_scatter_into
from core.memory.chunk import Chunk
from core.memory.store import Store, host_empty
from core.optim.norms import replicas, squares, sum_of_squares, sum_over
from core.zero.states import trained_slices


class GradientShards:
    WRITING = 1            # shards being written to a file store while backward goes on (each holds its buffer)

    def __init__(self, store: Store, axis: AxisGroup | None = None, stage: int = 2,
                 tp: AxisGroup | None = None, across: tuple[AxisGroup, ...] = ()) -> None:
        self.store = store
        self.axis = axis
        self.world = axis.size if axis is not None else 1
        self.rank = axis.rank if axis is not None else 0
        self.stage = stage
        self.tp = tp if tp is not None and tp.size > 1 else None   # parameters split over tensor parallelism
        self.across = across               # axes whose ranks hold other parameters (pipeline stages)
        self.seen: set[int] = set()          # chunks with a gradient in this step
        self._sumsq: dict[int, float] = {}
        self._total: float | None = None
        self.sink = None   # set: hand each complete shard to it instead of storing it
        self._writing: dict[int, Future] = {}     # shards on their way to a file store, by chunk

    def reduce(self, chunk: Chunk) -> None:
        full = chunk.grad
        chunk.grad, chunk.grads_seen = None, 0
        if full is None:
            return
        if self.world > 1:
            if self.stage == 1:
                shard = all_reduce_(full, self.axis)[chunk.shard(self.rank)]
            else:
                shard = torch.empty(chunk.shard_numel, dtype=full.dtype, device=full.device)
                reduce_scatter_into(shard, full, self.axis)
            shard.div_(self.world)
        else:
            shard = full
        if chunk.index in self.seen and self.sink is not None:
            raise RuntimeError(f"chunk {chunk.index} got a second gradient in one step; memory.step_in_backward "
                               f"needs train.grad_accum=1")
        if chunk.index in self.seen:         # an earlier micro-batch of this step
            shard = shard + self.get(chunk).to(shard.device)
        self._sumsq[chunk.index] = self._squares(chunk, shard)
        if self.sink is not None:
            self.sink(chunk, shard)
            self.seen.add(chunk.index)
            return
        if self.store.in_memory:
            self.store.write("grad", chunk.index, shard)
        else:
            # to the disk while backward goes on (a synchronous write held backward 5 s per step
            # for SD v1.5); at most WRITING shards wait for the disk at once
            while len(self._writing) >= self.WRITING:
                self._written(next(iter(self._writing)))
            self._writing[chunk.index] = self.store.write_async("grad", chunk.index, shard.to("cpu"))
        self.seen.add(chunk.index)
        self._total = None

    def _written(self, index: int) -> None:
        """Until the chunk's gradient write in flight, if any, is done."""
        writing = self._writing.pop(index, None)
        if writing is not None:
            writing.result()

    def settle(self) -> None:
        for index in list(self._writing):
            self._written(index)

    def _squares(self, chunk: Chunk, shard: torch.Tensor) -> float:
        """The shard's share of the squared gradient norm (one pass, no copy)."""
        if self.tp is None:         # every value of the shard is this rank's alone
            return float(sum_of_squares(shard))
        parts = ((shard[s], replicas(info.origin, self.tp)) for info, s in trained_slices(chunk, self.rank))
        return float(squares(parts))

    def get(self, chunk: Chunk) -> torch.Tensor:
        """This rank's gradient shard of the chunk (the slot itself for in-memory stores)."""
        grad, reading = self.start_get(chunk)
        if reading is not None:
            reading.result()
        return grad

    def start_get(self, chunk: Chunk) -> tuple[torch.Tensor, Future | None]:
        """`get`, started: the shard's buffer and the read in flight that fills it (None: ready)."""
        if self.store.in_memory:
            return self.store.view("grad", chunk.index), None
        self._written(chunk.index)
        buf = host_empty(chunk.shard_numel)
        return buf, self.store.read_async("grad", chunk.index, buf)

    def total_sq(self) -> float:
        """Sum of squares of the whole (unsharded, unsplit) gradient; one all-reduce of one number
        per axis (dp, and tp when parameters are split)."""
        if self._total is None:
            local = torch.tensor(math.fsum(self._sumsq[i] for i in self.seen), dtype=torch.float64)
            self._total = float(sum_over(local, (self.axis, self.tp, *self.across)))
        return self._total

    def combine(self, chunk: Chunk, axis: AxisGroup, counted: bool = True) -> None:
        """Sum this step's gradient shard of `chunk` with the same shard on the other ranks of
        `axis` (a weight tied across pipeline stages: its chunk is laid out alike on each, so the
        shards hold the same elements); `counted`: whether it enters this rank's share of the
        gradient norm (a tied weight's second copy does not)."""
        if chunk.index not in self.seen:
            return
        shard = self.get(chunk)
        all_reduce_(shard, axis, "sum")
        if not self.store.in_memory:
            self.store.write("grad", chunk.index, shard)
        self._sumsq[chunk.index] = self._squares(chunk, shard) if counted else 0.0
        self._total = None

    def reset(self) -> None:
        self.settle()
        self.seen.clear()
        self._sumsq.clear()
        self._total = None
