"""Weights that stream through the compute device a layer at a time, for generation.

The model is built on the meta device; the chunk manager (`core.memory.manager`) makes its
parameters chunk by chunk (`materialize` reads each tensor from the checkpoint), writes them home
(host memory, or a pre-allocated file on NVMe read with direct IO) and keeps at most `budget`
bytes of them on the device. Each layer's parameters fill chunks of their own, with no padding:
reading a layer reads nothing else. Part of the budget holds chunks for good; the rest is a window
of two of the largest layers through which the others stream. Generation runs the layers in the
same order at every token step, so that order is given to the manager up front (`Tracer.expect`,
cyclic): while a layer computes, the chunks of the layers after it are read in the background as
far as the window allows, wrapping round to the next step's first layers.

    stream = WeightStream(model, layers, "nvme", budget, torch.bfloat16, device, materialize=...)
    with stream.resident(i):        # layer i's weights on the device, pinned there
        h = layers[i].run(h, step)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from core.errors import LoomError
from core.inference.steps import InferenceLayer
from core.memory.chunk import packing_order, plan_chunks
from core.memory.manager import AutoPolicy, ChunkManager, MemoryStats, human
from core.memory.state import TensorState
from core.memory.store import MemoryStore, NVMeStore, return_freed_buffers_to_the_os

S = TensorState


def layer_params(model: nn.Module, layer: InferenceLayer) -> list[nn.Parameter]:
    seen, out = set(), []
    for name in layer.modules:
        for p in model.get_submodule(name).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def layer_breaks(model: nn.Module, layers: list[InferenceLayer]) -> frozenset[str]:
    """The parameters (in packing order) at which another layer's parameters begin: each layer's
    weights then fill chunks of their own, and reading a layer reads nothing of its neighbours."""
    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        for p in layer_params(model, layer):
            owner.setdefault(id(p), i)
    breaks, previous = set(), None
    for name, p in packing_order(list(model.named_parameters())):
        if owner.get(id(p)) != previous:
            breaks.add(name)
            previous = owner.get(id(p))
    return frozenset(breaks)


def plan_layers(model: nn.Module, layers: list[InferenceLayer], chunk_numel: int, dtype: torch.dtype):
    """(chunk bytes, each layer's chunk indices in order of use, the planned chunks, the parameters
    where a layer's chunks begin) as the manager will pack them: chunks of at most `chunk_numel`
    elements that never span two layers and carry no padding."""
    named = packing_order(list(model.named_parameters()))
    breaks = layer_breaks(model, layers)
    planned = plan_chunks([p.numel() for _, p in named], chunk_numel, [p.requires_grad for _, p in named],
                          breaks=[n in breaks for n, _ in named], trim=True)
    chunk_of: dict[int, int] = {}
    it = iter(named)
    for index, c in enumerate(planned):
        for _ in range(c.count):
            chunk_of[id(next(it)[1])] = index
    sizes = [c.capacity * dtype.itemsize for c in planned]
    per_layer = []
    for layer in layers:
        order: list[int] = []
        for p in layer_params(model, layer):
            if chunk_of[id(p)] not in order:
                order.append(chunk_of[id(p)])
        per_layer.append(order)
    return sizes, per_layer, planned, breaks


def smallest_budget(sizes: list[int], per_layer: list[list[int]]) -> int:
    """The fewest bytes of weights on the device that run: the largest layer's chunks at once (and
    never less than the two largest chunks, the manager's own floor)."""
    layer = max((sum(sizes[i] for i in chunks) for chunks in per_layer), default=0)
    return max(layer, sum(sorted(sizes, reverse=True)[:2]))


def gib_up(nbytes: int) -> str:
    """`nbytes` in GiB, rounded up to 4 significant digits (a budget that names it is enough)."""
    x = nbytes / 2**30
    if x <= 0:
        return "0"
    unit = 10.0 ** (math.floor(math.log10(x)) - 3)
    return f"{math.ceil(x / unit) * unit:.4g}"


class WeightStream:
    """`where`: "host" (the home copy in host memory) or "nvme" (in a file under `nvme_dir`)."""

    def __init__(self, model: nn.Module, layers: list[InferenceLayer], where: str, budget: int,
                 dtype: torch.dtype, device: torch.device, chunk_mb: float = 32.0, nvme_dir: str | Path = "",
                 io_threads: int = 4, materialize: Callable[[str, torch.Tensor], None] | None = None,
                 setting: str = "memory.device_gb", direct: bool = True) -> None:
        if where not in ("host", "nvme"):
            raise ValueError(f"weights stream from host or nvme, not {where!r}")
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.layers, self.where = model, layers, where
        chunk_numel = max(1, int(chunk_mb * 2**20 / dtype.itemsize))
        sizes, self.per_layer, planned, breaks = plan_layers(model, layers, chunk_numel, dtype)
        self.total_bytes = sum(sizes)
        self.min_budget = smallest_budget(sizes, self.per_layer)
        if budget < self.min_budget:
            largest = max(range(len(layers)), key=lambda i: sum(sizes[c] for c in self.per_layer[i]))
            raise LoomError(f"{setting} allows {human(budget)} of weights on the device, but layer "
                            f"{layers[largest].name!r} alone needs {human(self.min_budget)}: the smallest budget "
                            f"that runs is {setting}={gib_up(self.min_budget)} (about twice that lets reading "
                            f"overlap computing)")
        if where == "nvme":
            used = [c.used * dtype.itemsize for c in planned]
            slot = max(c.capacity for c in planned) * dtype.itemsize
            home = NVMeStore(Path(nvme_dir or "nvme"), {"param": (len(planned), slot)}, threads=io_threads,
                             used={"param": used}, setting="memory.nvme_dir", direct=direct, unlinked=True)
            home.drop_cache = True
        else:
            home = MemoryStore(pin=torch.device(device).type == "cuda", threads=io_threads)
        self.home = home
        # Chunks fit their layers, so many are smaller than memory.chunk_mb; each of 1 MiB or more
        # gets its own mapping, returned to the OS when evicted. Left to glibc, freed chunks under its
        # (rising) mmap threshold stay in the heap: measured on a 1.3 B OPT streaming through 0.5 GiB,
        # 1.4 GiB of anonymous memory, and the cgroup cap's kill.
        return_freed_buffers_to_the_os(1 << 20, keep_top=2 << 20)
        self.manager = ChunkManager(model, chunk_numel, dtype, device, home, budget, AutoPolicy(),
                                    prefetch=len(planned), materialize=materialize,
                                    breaks=breaks, trim=True,
                                    # fresh host pages cost the kernel's zeroing; on a GPU the caching
                                    # allocator reuses freed blocks already
                                    pool=torch.device(device).type == "cpu")
        return_freed_buffers_to_the_os(1 << 20, keep_top=2 << 20)       # the manager sets its own
        order: list[int] = []
        for chunks in self.per_layer:
            for c in chunks:
                if not order or order[-1] != c:
                    order.append(c)
        if len(order) > 1 and order[0] == order[-1]:    # a tied head and embedding: one use across the wrap
            order.pop()
        self.kept = self._keep(budget)
        self._kept_set = kept = set(self.kept)
        self.manager.tracer.expect([c for c in order if c not in kept] or order)
        self.manager.stats = MemoryStats()               # count what generation moves, not the build

    def _keep(self, budget: int) -> list[int]:
        """Chunks that stay on the device for good. Streaming a cyclic order through a budget
        smaller than the model re-reads everything whatever is evicted (each chunk leaves before
        its turn comes round again), so the budget is split: a window of two of the largest
        layers streams (one computing, the next being read), and the rest holds chunks that are
        then never read again, the most used first (a tied embedding serves two layers)."""
        room = budget - min(budget, 2 * self.min_budget)
        if budget >= self.total_bytes:
            room = budget
        uses: dict[int, int] = {}
        for chunks in self.per_layer:
            for c in chunks:
                uses[c] = uses.get(c, 0) + 1
        kept = []
        for c in sorted(uses, key=lambda c: (-uses[c], c)):
            chunk = self.manager.chunks[c]
            if chunk.nbytes <= room:
                room -= chunk.nbytes
                kept.append(c)
        self.manager.evict_all()
        for c in kept:
            chunk = self.manager.chunks[c]
            self.manager.access(chunk)
            for info in chunk.tensors:
                chunk.set_state(info, S.COMPUTE)       # never evictable
        return kept

    def start_pass(self) -> None:
        """A token step begins: the layers run from the first again."""
        self.manager.tracer.restart()

    @contextmanager
    def resident(self, index: int) -> Iterator[None]:
        """Layer `index`'s chunks on the device and pinned while the layer runs."""
        pinned = []
        streamed = [c for c in self.per_layer[index] if c not in self._kept_set]
        for c in streamed:
            chunk = self.manager.chunks[c]
            self.manager.access(chunk)
            for info in chunk.tensors:
                if info.state is not S.COMPUTE:
                    chunk.set_state(info, S.COMPUTE)
                    pinned.append((chunk, info))
        try:
            yield
        finally:
            for chunk, info in pinned:
                chunk.set_state(info, S.HOLD_AFTER_FWD)
            for c in streamed:
                self.manager.release(self.manager.chunks[c])

    @property
    def bytes_read(self) -> int:
        """Bytes of weights moved to the device (what the store read, for NVMe)."""
        return getattr(self.home, "bytes_read", None) or self.manager.stats.bytes_in

    def settle(self) -> None:
        """Wait for the reads in flight (those that began for a next pass that will not come)."""
        self.manager.drain()

    def close(self) -> None:
        self.settle()
        self.home.close()
