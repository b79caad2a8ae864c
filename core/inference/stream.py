"""Weights that stream through the compute device a layer at a time, for generation.

The model is built on the meta device; the chunk manager (`core.memory.manager`) makes its
parameters chunk by chunk (`materialize` reads each tensor from the checkpoint), writes them home
(host memory, or a pre-allocated file on NVMe) and keeps at most `budget` bytes of them on the
device. On the CPU, with the NVMe file read through the page cache, the streamed parameters are
views of the file's mapping instead, and streaming brings a layer's pages in ahead of it and drops
them after it (`WeightStream._map`): no byte is copied. Each layer's parameters fill chunks of
their own, with no padding: reading a layer reads nothing else. Part of the budget holds chunks for
good; the rest is a window of two of the largest layers through which the others stream.
Generation runs the layers in the same order at every token step, so that order is given to the
manager up front (`Tracer.expect`, cyclic): while a layer computes, the chunks of the layers after
it are read in the background as far as the window allows, wrapping round to the next step's
first layers.

    stream = WeightStream(model, layers, "nvme", budget, torch.bfloat16, device, materialize=...)
    with stream.resident(i):        # layer i's weights on the device, pinned there
        h = layers[i].run(h, step)
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
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
from core.memory.store import MemoryStore, NVMeStore, populate, return_freed_buffers_to_the_os, unpopulate

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
        # NVMe read through the page cache on the CPU: the streamed layers read the file's mapping
        self.mapped = (where == "nvme" and isinstance(home, NVMeStore) and not home.direct
                       and torch.device(device).type == "cpu" and any(c not in kept for c in order))
        if self.mapped:
            try:
                self._map(budget, [c for c in order if c not in kept])
            except OSError:             # the system would not map the file: read into chunk buffers
                self.mapped = False

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

    # ------------------------------------------------------------------ mapped streaming

    def _map(self, budget: int, order: list[int]) -> None:
        """Point the streamed chunks' parameters into the NVMe file's mapping, and stream by
        bringing pages in ahead (one background thread, `populate`) and dropping them after use.

        Reading into the chunks' own buffers copies every byte from the page cache, and on a CPU
        the copying takes the cores the layers compute on: streaming an OPT-6.7B shape on 2 cores,
        the copy-in reader moved 6.7 GB/s into chunk buffers, while touching the mapping ahead of a
        layer that computes straight from the cached pages read 9 GB/s beside the computing, using
        a tenth of the CPU. The chunk manager built the file and keeps the chunks held for good;
        the window is the budget they leave, as before."""
        whole = self.home.map("param")
        self._views: dict[int, torch.Tensor] = {}
        for c in set(order):
            chunk = self.manager.chunks[c]
            start, used = self.home.slot("param", c)
            view = whole[start:start + used]
            values = view.view(chunk.dtype)
            for info in chunk.tensors:
                info.param.data = values[info.offset:info.offset + info.numel].view(info.param.shape)
            self._views[c] = view
        pool = self.manager.pool                 # evicted buffers the mapping has no use for
        while pool is not None and pool.drop():
            pass
        kept_bytes = sum(self.manager.chunks[c].nbytes for c in self.kept)
        self._kept_bytes = kept_bytes
        self._window = max(budget - kept_bytes, 0)
        self._order = order                      # the streamed chunks in order of use, cyclic
        self._pos = 0                            # the next position of `_order` to bring in
        self._queue: deque[tuple[int, Future]] = deque()
        self._held = 0                           # bytes brought in (or coming) and not yet dropped
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-map")

    def _bring(self, always: bool = False) -> None:
        """Queue the next chunks in order of use while the window has room."""
        while len(self._queue) < len(self._order):
            c = self._order[self._pos]
            size = self._views[c].numel()
            if self._held + size > self._window and not (always and not self._queue):
                break
            self._queue.append((c, self._reader.submit(populate, self._views[c])))
            self._held += size
            self._pos = (self._pos + 1) % len(self._order)

    def _drop(self, c: int) -> None:
        view = self._views[c]
        unpopulate(view)
        start, used = self.home.slot("param", c)
        self.home.drop_pages("param", start, used)
        self._held -= view.numel()

    def _restart_at(self, c: int) -> None:
        """Chunk `c` is wanted and not next in the queue (the layers ran off the expected order, or
        the window was empty): drop what was brought in, and go on from `c`."""
        while self._queue:
            d, future = self._queue.popleft()
            future.result()
            self._drop(d)
        if self._order[self._pos] != c:
            self._pos = self._order.index(c)
        self._bring(always=True)

    @contextmanager
    def _resident_mapped(self, index: int) -> Iterator[None]:
        stats = self.manager.stats
        taken = []
        for c in (c for c in self.per_layer[index] if c not in self._kept_set):
            ahead = bool(self._queue) and self._queue[0][0] == c
            if not ahead:
                self._restart_at(c)
            c, future = self._queue.popleft()
            stats.fetches += 1
            stats.prefetch_hits += ahead
            t0 = time.perf_counter()
            future.result()
            stats.wait_seconds += time.perf_counter() - t0
            taken.append(c)
        stats.peak_resident = max(stats.peak_resident, self._kept_bytes + self._held)
        try:
            yield
        finally:
            read = 0
            for c in taken:
                self._drop(c)
                read += self._views[c].numel()
            stats.bytes_in += read
            self.home.count_read(read)
            self._bring()

    # ------------------------------------------------------------------ passes

    def start_pass(self) -> None:
        """A token step begins: the layers run from the first again."""
        self.manager.tracer.restart()

    @contextmanager
    def resident(self, index: int) -> Iterator[None]:
        """Layer `index`'s chunks on the device and pinned while the layer runs."""
        if self.mapped:
            with self._resident_mapped(index):
                yield
            return
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
        if self.mapped:
            for _, future in self._queue:
                future.result()

    def close(self) -> None:
        self.settle()
        if self.mapped:
            self._reader.shutdown(wait=True)
            while self._queue:
                self._drop(self._queue.popleft()[0])
        self.home.close()
