"""An exponential moving average of weights that live in chunks.

`core.ema.EMA` keeps a copy of every trained weight beside the model and reads the weights after
each step; with chunked parameters neither is possible (the weights are not tensors between
steps, and a second full-precision copy of the model on the device is what offloading avoids).
`ChunkEMA` keeps the average as one more optimizer state, "ema", beside the fp32 master weights
and the moments of this rank's shard of every trained chunk, in the same store (device, host or
NVMe), and updates it chunk by chunk after each step from the master weights. It offers what
`EMA` offers (`update`, `swapped_in`, `use_average`, `state_dict` / `load_state_dict` by the
module's parameter names, so a checkpoint's average loads into either); the same warm-up of the
decay, (1 + n) / (10 + n) up to its maximum.

Swapping the average in exchanges the master and "ema" states of the module's slices, chunk by
chunk, and refreshes the working copies from the master: the master weights are never lost, and
no more than one chunk's states are in memory at once. Under data parallelism every rank takes
part in `swapped_in`, `use_average` and the checkpoint methods (the working copies are gathered).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from core.memory.chunk import Chunk
from core.memory.store import host_empty
from core.zero.states import trained_slices


class ChunkEMA:
    kind = "ema"

    def __init__(self, plugin, module: nn.Module, decay: float = 0.9999) -> None:
        self.plugin = plugin               # its optimizer (the ChunkOptimizer) exists once it configured
        self.module = module
        self.decay = decay
        self.updates = 0
        self._names: dict[nn.Parameter, str] | None = None
        self._started = False
        self._blend_step, self._blend_chunks, self._blend_weight = -1, set(), 0.0   # see begin_blend

    # ------------------------------------------------------------------ where the states are

    @property
    def _optim(self):
        optimizer = self.plugin.optimizer
        if optimizer is None:
            raise RuntimeError("the EMA of chunked weights starts when the zero plugin configures the model")
        return optimizer

    @property
    def _module_names(self) -> dict[nn.Parameter, str]:
        if self._names is None:            # the parameters as the chunks hold them (after configure)
            self._names = {p: n for n, p in self.module.named_parameters()}
        return self._names

    def _slices(self, chunk: Chunk):
        """(module name, tensor, part of this rank's shard) of the module's trained parameters in
        the chunk."""
        for info, s in trained_slices(chunk, self._optim.manager.rank):
            name = self._module_names.get(info.param)
            if name is not None:
                yield name, info, s

    def _chunks(self) -> list[Chunk]:
        """The trained chunks holding some of the module's parameters (the same on every rank)."""
        return [c for c in self._optim.manager.chunks
                if c.trained and any(info.param in self._module_names for info in c.tensors)]

    def _get(self, kind: str, chunk: Chunk) -> torch.Tensor:
        return self._optim.optim.get(kind, chunk)

    def _put(self, kind: str, chunk: Chunk, value: torch.Tensor) -> None:
        store = self._optim.states
        if not store.in_memory:
            store.write(kind, chunk.index, value)

    def start(self) -> None:
        """The average begins at the master weights (the plugin calls this when it configures)."""
        if self._started:
            return
        self._optim.manager.settle_all()
        for chunk in self._optim.manager.chunks:
            if chunk.trained:
                self._optim.states.write(self.kind, chunk.index, self._get("master", chunk).clone())
        self._started = True

    # ------------------------------------------------------------------ what EMA offers

    # ------------------------------------------------------------------ blended during the step

    def begin_blend(self, step: int, chunks: list[Chunk]) -> tuple[str, ...]:
        """The optimizer's step `step` is about to update `chunks` with its states in files: it
        reads this average with them and calls `blend` after each chunk's update, which saves
        reading every master weight again in `update`. Returns the kinds to read with the states
        (none: this step's update blends on its own, e.g. chunks it does not cover)."""
        mine = {c.index for c in self._chunks()}
        if not self._started or not mine <= {c.index for c in chunks}:
            return ()
        self._blend_step, self._blend_chunks = step, mine
        self._blend_weight = 1.0 - self._decay_at(self.updates + 1)
        return (self.kind,)

    def blends(self, chunk: Chunk) -> bool:
        return chunk.index in self._blend_chunks

    @torch.no_grad()
    def blend(self, chunk: Chunk, master: torch.Tensor, average: torch.Tensor) -> None:
        for _, _, s in self._slices(chunk):
            average[s].lerp_(master[s], self._blend_weight)

    def _decay_at(self, updates: int) -> float:
        return min(self.decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self) -> None:
        """Blend the master weights of the step just taken into the average (done already, chunk
        by chunk, when the step itself could: `begin_blend`)."""
        self.start()
        self.updates += 1
        if self._blend_step == self._optim.step_count and self._blend_chunks:
            self._blend_step, self._blend_chunks = -1, set()
            return
        d = self._decay_at(self.updates)
        self._optim.manager.settle_all()
        store = self._optim.states
        if store.in_memory:
            for chunk in self._chunks():
                master, ema = self._get("master", chunk), self._get(self.kind, chunk)
                for _, _, s in self._slices(chunk):
                    ema[s].lerp_(master[s].to(ema.device), 1.0 - d)
            return
        # Files: the next chunk's master and average are read while this one blends, and its
        # write goes on while the next blends (serially, SD v1.5's average took 8 s per step).
        def start(chunk: Chunk):
            bufs = [host_empty(chunk.shard_numel) for _ in range(2)]
            return bufs, [store.read_async(kind, chunk.index, b) for kind, b in zip(("master", self.kind), bufs)]

        chunks = self._chunks()
        reading = start(chunks[0]) if chunks else None
        writing = None
        try:
            for i, chunk in enumerate(chunks):
                (master, ema), reads = reading
                reading = start(chunks[i + 1]) if i + 1 < len(chunks) else None
                for r in reads:
                    r.result()
                for _, _, s in self._slices(chunk):
                    ema[s].lerp_(master[s], 1.0 - d)
                if writing is not None:
                    writing.result()
                writing = store.write_async(self.kind, chunk.index, ema)
        finally:                       # nothing in flight into or out of these buffers afterwards
            for f in (reading[1] if reading is not None else []) + ([writing] if writing is not None else []):
                f.exception()
        if writing is not None:
            writing.result()

    @torch.no_grad()
    def _exchange(self) -> None:
        """Master and average trade places on the module's slices; working copies follow the master."""
        manager = self._optim.manager
        manager.settle_all()
        for chunk in self._chunks():
            master, ema = self._get("master", chunk), self._get(self.kind, chunk)
            for _, _, s in self._slices(chunk):
                held = master[s].clone()
                master[s].copy_(ema[s])
                ema[s].copy_(held)
            self._put("master", chunk, master)
            self._put(self.kind, chunk, ema)
            manager.update_working(chunk, master if chunk.dtype == torch.float32 else master.to(chunk.dtype))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for the duration of the block (every rank enters)."""
        self.start()
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    def use_average(self) -> None:
        """Make the averages the weights (at the end of training, before an export): the master
        weights become the averages."""
        self.start()
        self._exchange()

    def state_dict(self) -> dict:
        self.start()
        shadow: dict[str, torch.Tensor] = {}
        for chunk in self._chunks():
            full = self._optim.optim.full(self.kind, chunk).cpu()
            for name, info, _ in self._slices(chunk):
                shadow[name] = full[info.offset:info.offset + info.numel].clone().view(info.param.shape)
        return {"updates": self.updates, "decay": self.decay, "shadow": shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.start()
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
        rank = self._optim.manager.rank
        for chunk in self._chunks():
            ema = self._get(self.kind, chunk)
            shard = chunk.shard(rank)
            for name, info, s in self._slices(chunk):
                values = state["shadow"][name].reshape(-1).to(ema.device, torch.float32)
                start = max(info.offset, shard.start) - info.offset
                ema[s].copy_(values[start:start + (s.stop - s.start)])
            self._put(self.kind, chunk, ema)
