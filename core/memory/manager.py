"""The chunk manager: which chunks are on the compute device, and moving them.

Chunks are built from a model's parameters, in the order the model lists them (its forward
order for the models here). The manager keeps the bytes of resident chunks under a budget;
when a chunk must come in and the budget is full, the placement policy picks which resident
chunk leaves. A `Tracer` records the order in which chunks are used during a step; from the
second step on, that order drives the auto policy (evict the chunk whose next use is furthest in
the future) and prefetching (start reading the next chunks before they are asked for).
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from core.distributed.comm import AxisGroup, all_gather_into, broadcast_
from core.errors import LoomError
from core.memory.chunk import Chunk, PayloadPool, TensorInfo, packing_order, plan_chunks
from core.memory.store import MMAP_THRESHOLD_MAX, Store, _round_up, return_freed_buffers_to_the_os


def human(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes:.0f} B"


class Tracer:
    """The sequence of chunk uses in a step; the previous step's sequence predicts this one's."""

    def __init__(self) -> None:
        self.current: list[int] = []
        self.previous: list[int] | None = None
        self._positions: dict[int, list[int]] = {}

    def record(self, index: int) -> None:
        if not self.current or self.current[-1] != index:
            self.current.append(index)

    def end_step(self) -> None:
        if self.current:
            self.previous = self.current
            positions: dict[int, list[int]] = defaultdict(list)
            for pos, index in enumerate(self.previous):
                positions[index].append(pos)
            self._positions = dict(positions)
        self.current = []

    def next_use(self, index: int) -> float:
        """Position of the chunk's next use in the predicted sequence (inf: not again this step)."""
        if self.previous is None:
            return float("nan")
        positions = self._positions.get(index, [])
        i = bisect.bisect_left(positions, len(self.current))
        return positions[i] if i < len(positions) else float("inf")

    def expect(self, sequence: list[int], cyclic: bool = True) -> None:
        """Predict from a known order of use instead of a traced step (generation: every token
        step runs the layers in order). `cyclic`: the order repeats, so near its end the next
        pass's first chunks are the ones coming."""
        self.previous = list(sequence) * (2 if cyclic else 1)
        positions: dict[int, list[int]] = defaultdict(list)
        for pos, index in enumerate(self.previous):
            positions[index].append(pos)
        self._positions = dict(positions)
        self.current = []

    def restart(self) -> None:
        """A new pass of the expected order begins."""
        self.current = []

    def upcoming(self, count: int) -> list[int]:
        if self.previous is None:
            return []
        seen, out = set(), []
        for index in self.previous[len(self.current):]:
            if index not in seen:
                seen.add(index)
                out.append(index)
                if len(out) == count:
                    break
        return out


class Policy:
    """Chooses which resident chunk leaves when room is needed."""

    name = "policy"

    def victim(self, manager: "ChunkManager", candidates: list[Chunk]) -> Chunk:
        raise NotImplementedError

    def after_use(self, manager: "ChunkManager", chunk: Chunk) -> None:
        """Called when an operation is done with the chunk."""


class AutoPolicy(Policy):
    """Fit the budget; evict the chunk used furthest in the future (least recently used before
    the first step has been traced)."""

    name = "auto"

    def victim(self, manager: "ChunkManager", candidates: list[Chunk]) -> Chunk:
        tracer = manager.tracer
        if tracer.previous is None:
            return min(candidates, key=lambda c: manager.last_use.get(c.index, -1))
        return max(candidates, key=lambda c: (tracer.next_use(c.index), -manager.last_use.get(c.index, -1)))


class StaticPolicy(AutoPolicy):
    """A fixed fraction of the chunks lives off the device and leaves again right after each use;
    the others stay (the budget still bounds them)."""

    name = "static"

    def __init__(self, offload_fraction: float) -> None:
        self.offload_fraction = offload_fraction

    def offloaded(self, manager: "ChunkManager", chunk: Chunk) -> bool:
        n = len(manager.chunks)
        return chunk.index >= n - round(self.offload_fraction * n)

    def after_use(self, manager: "ChunkManager", chunk: Chunk) -> None:
        if self.offloaded(manager, chunk) and chunk.evictable:
            manager.evict(chunk)


def make_policy(name: str, offload_fraction: float = 0.0) -> Policy:
    if name == "auto":
        return AutoPolicy()
    if name == "static":
        return StaticPolicy(offload_fraction)
    raise LoomError(f"memory.policy: got {name!r}; allowed: auto, static")


@dataclass
class MemoryStats:
    fetches: int = 0
    evictions: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    prefetch_hits: int = 0
    wait_seconds: float = 0.0
    peak_resident: int = 0


class ChunkManager:
    """Chunks of one model, where they are, and moving them.

    `axis` is the data-parallel axis (None or size 1: one rank). With `shard_params` (ZeRO stage
    3) each rank's home copy is only its shard of every chunk and a fetch is an all-gather;
    otherwise every rank has the whole chunk at home. `materialize(name, out)` fills in
    parameters that were created on the meta device (a model too large to build in memory is
    built on `meta` and its weights made chunk by chunk). `on_master(chunk, fp32_shard)` receives
    the full-precision initial values of this rank's shard of each chunk as it is built.
    The parameters named in `alone` come first, each in a chunk of its own; a new chunk starts at
    each parameter named in `breaks`, and with `trim` no chunk is larger than what it holds.
    """

    def __init__(self, model: nn.Module, chunk_numel: int, dtype: torch.dtype, device: torch.device,
                 home: Store, budget_bytes: int, policy: Policy, prefetch: int = 2,
                 axis: AxisGroup | None = None, shard_params: bool = False,
                 materialize: Callable[[str, torch.Tensor], None] | None = None,
                 on_master: Callable[[Chunk, torch.Tensor], None] | None = None,
                 alone: tuple[str, ...] = (), breaks: frozenset[str] = frozenset(), trim: bool = False,
                 pool: bool = False) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.home = home
        self.budget = budget_bytes
        self.policy = policy
        self.axis = axis
        self.world = axis.size if axis is not None else 1
        self.rank = axis.rank if axis is not None else 0
        self.shard_params = shard_params and self.world > 1
        # collectives must run in the same order on every rank: no asynchronous gathers
        self.prefetch_depth = 0 if self.shard_params else prefetch
        self.tracer = Tracer()
        self.stats = MemoryStats()
        self.chunks: list[Chunk] = []
        self.where: dict[nn.Parameter, tuple[Chunk, TensorInfo]] = {}
        self.last_use: dict[int, int] = {}
        self._clock = 0
        self._pending: dict[int, Future] = {}
        self._busy: dict[int, Future] = {}               # optimizer updates in flight, by chunk
        self._storage: dict[int, Chunk] = {}
        # bytes of the resident payloads, kept as chunks come and go: the budget is checked at every
        # access and prefetch, and summing hundreds of chunks each time cost a streamed generation
        # more than its waits for the disk
        self._resident_bytes = 0
        # `pool`: evicted payloads' memory is kept for the next fetch of a chunk of its size
        # (`PayloadPool`), within the budget: what streams a model through a fixed window
        self.pool = PayloadPool() if pool and PayloadPool.usable() else None
        params = packing_order(list(model.named_parameters()), alone)     # tied parameters come once
        self.plan = plan_chunks([p.numel() for _, p in params], chunk_numel,
                                [p.requires_grad for _, p in params], self.world,
                                alone=sum(n in alone for n, _ in params),
                                breaks=[n in breaks for n, _ in params] if breaks else None, trim=trim)
        element = torch.tensor([], dtype=dtype).element_size()
        self.chunk_numel = _round_up(max(1, chunk_numel), self.world)   # a parameter larger has its own
        self.chunk_bytes = self.chunk_numel * element
        two = sum(sorted((c.capacity for c in self.plan), reverse=True)[:2]) * element
        if params and budget_bytes < two:
            raise LoomError(f"memory.device_gb allows {human(budget_bytes)} on the device but one step needs at "
                            f"least two chunks ({human(two)}: the largest two); raise memory.device_gb or lower "
                            f"memory.chunk_mb")
        if self.chunk_bytes < MMAP_THRESHOLD_MAX:
            # chunk buffers leave the process when evicted; smaller temporaries (activations)
            # keep glibc's reuse of heap memory (larger chunks are mapped on their own anyway)
            threshold = max(self.chunk_bytes, 1 << 20)
            return_freed_buffers_to_the_os(threshold, keep_top=2 * threshold)
        owners: dict[nn.Parameter, list[tuple[nn.Module, str]]] = defaultdict(list)
        for _, module in model.named_modules(remove_duplicate=False):
            for pname, p in module._parameters.items():
                if p is not None:
                    owners[p].append((module, pname))
        it = iter(params)
        for planned in self.plan:
            chunk = Chunk(len(self.chunks), planned.capacity, dtype, self.device, world=self.world)
            self.chunks.append(chunk)
            self._resident_bytes += chunk.nbytes
            # values are made in fp32 where fp32 master weights are taken from them or ranks agree on
            # them; otherwise straight into the payload (a bf16 generation never holds a chunk's
            # fp32 copy: 1 GB beside a 515 MB embedding)
            staging = (chunk.payload if on_master is None and self.world == 1 else
                       torch.zeros(planned.capacity, dtype=torch.float32, device=self.device))
            for _ in range(planned.count):
                name, param = next(it)
                values = staging[chunk.used:chunk.used + param.numel()].view(param.shape)
                if param.is_meta:
                    if materialize is None:
                        raise LoomError(f"{name} is on the meta device and nothing was given to initialise it")
                    with torch.no_grad():
                        materialize(name, values)
                else:
                    values.copy_(param.detach())
                info = chunk.append(name, param)
                if info.param is not param:
                    for module, pname in owners[param]:
                        module._parameters[pname] = info.param
                self.where[info.param] = (chunk, info)
            self._seal(chunk, staging, on_master)
        self.enforce_budget()

    def _seal(self, chunk: Chunk, staging: torch.Tensor, on_master) -> None:
        """A chunk is fully packed: agree on its values, hand out the master shard, write home."""
        if self.world > 1:   # every rank starts from rank 0's weights, as DDP does
            broadcast_(staging, self.axis, 0)
        if staging is not chunk.payload:
            with torch.no_grad():
                chunk.payload.copy_(staging)
        if on_master is not None:
            on_master(chunk, staging[chunk.shard(self.rank)])
        self._storage[chunk.payload.untyped_storage()._cdata] = chunk
        self.home.write("param", chunk.index, self._home_part(chunk.payload, chunk))
        chunk.dirty = False
        self._make_room(0, protect={chunk.index})

    def _home_part(self, full: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        return full[chunk.shard(self.rank)] if self.shard_params else full

    # ------------------------------------------------------------------ lookup

    @property
    def resident_bytes(self) -> int:
        return self._resident_bytes

    @property
    def held_bytes(self) -> int:
        """The resident payloads and the pooled memory kept for the next: what the budget bounds."""
        return self._resident_bytes + (self.pool.bytes if self.pool is not None else 0)

    def _fits(self, nbytes: int) -> bool:
        """A fetch of `nbytes` stays within the budget (a pooled buffer of its size is held already)."""
        new = 0 if self.pool is not None and self.pool.has(nbytes) else nbytes
        return self.held_bytes + new <= self.budget

    def chunk_of(self, tensor: torch.Tensor) -> Chunk | None:
        """The chunk whose payload `tensor` is a view of, if any."""
        try:
            return self._storage.get(tensor.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):
            return None

    def info_at(self, chunk: Chunk, storage_offset: int) -> TensorInfo | None:
        for info in chunk.tensors:
            if info.offset <= storage_offset < info.offset + info.numel:
                return info
        return None

    # ------------------------------------------------------------------ moving

    def mark_busy(self, chunk: Chunk, update: Future) -> None:
        """An update of the chunk's weights runs in another thread: the chunk stays where it is
        until it is done."""
        self._busy[chunk.index] = update

    def _settle(self, chunk: Chunk) -> None:
        update = self._busy.pop(chunk.index, None)
        if update is not None:
            update.result()
        self._wait(chunk)

    def settle_all(self) -> None:
        """Wait for every update in flight (and raise the first error one of them met)."""
        for index in list(self._busy):
            self._settle(self.chunks[index])

    def evict(self, chunk: Chunk) -> None:
        self._settle(chunk)
        if chunk.dirty and not self.shard_params:
            self.home.write("param", chunk.index, chunk.payload)
            self.stats.bytes_out += chunk.nbytes
            chunk.dirty = False
        chunk.free_payload(self.pool)
        self._resident_bytes -= chunk.nbytes
        self.stats.evictions += 1

    def _make_room(self, nbytes: int, protect: set[int]) -> None:
        while not self._fits(nbytes):
            if self.pool is not None and self.pool.drop(keep=nbytes):
                continue                    # pooled memory goes before a chunk that may be used
            candidates = [c for c in self.chunks if c.evictable and c.index not in protect
                          and c.index not in self._pending and c.index not in self._busy]
            if not candidates:    # wait for a transfer or an update in flight rather than fail
                candidates = [c for c in self.chunks if c.evictable and c.index not in protect]
            if not candidates:
                raise LoomError(f"memory.device_gb ({human(self.budget)}) cannot hold the chunks one operation "
                                f"uses at once ({human(self.resident_bytes + nbytes)} needed); raise "
                                f"memory.device_gb or lower memory.chunk_mb")
            self.evict(self._victim(candidates, nbytes))

    def _victim(self, candidates: list[Chunk], nbytes: int) -> Chunk:
        """The policy's pick; with a pool, among the candidates of the size being fetched where there
        are any (its memory then serves the fetch as it is, not freed for fresh pages)."""
        if self.pool is not None and nbytes:
            same = [c for c in candidates if c.nbytes == nbytes]
            candidates = same or candidates
        return self.policy.victim(self, candidates)

    def _start_fetch(self, chunk: Chunk) -> None:
        chunk.alloc_payload(self.pool)
        self._resident_bytes += chunk.nbytes
        self.stats.fetches += 1
        if self.shard_params:   # read this rank's shard, gather the others'
            shard = torch.empty(chunk.shard_numel, dtype=chunk.dtype, device=self.device)
            self.home.read("param", chunk.index, shard)
            self.stats.bytes_in += shard.numel() * shard.element_size()
            self._all_gather(chunk.payload, shard)
            return
        self._pending[chunk.index] = self.home.read_async("param", chunk.index, chunk.payload)
        self.stats.bytes_in += chunk.nbytes

    def _all_gather(self, out: torch.Tensor, shard: torch.Tensor) -> None:
        all_gather_into(out, shard, self.axis)

    @property
    def master_is_home(self) -> bool:
        """The home copy of the working weights is the fp32 master shard itself."""
        return self.home.aliases.get("param") == "master"

    def update_working(self, chunk: Chunk, shard: torch.Tensor) -> None:
        """The optimizer's new weights for this rank's shard of the chunk: put them wherever the
        working copy lives (the resident payload, the home copy, the other ranks' payloads)."""
        work = shard.to(chunk.dtype)
        if self.world == 1:
            if chunk.resident:
                self._wait(chunk)
                if work.data_ptr() != chunk.payload.data_ptr():
                    chunk.payload.copy_(work)
                chunk.dirty = not self.master_is_home
            elif not self.master_is_home:
                self.home.write("param", chunk.index, work)
            return
        if self.shard_params:
            if not self.master_is_home:
                self.home.write("param", chunk.index, work)
            if chunk.resident:
                self._all_gather(chunk.payload, work)
            return
        if chunk.resident:
            self._wait(chunk)
            self._all_gather(chunk.payload, work)
            chunk.dirty = True
        else:
            full = torch.empty(chunk.capacity, dtype=chunk.dtype, device=self.device)
            self._all_gather(full, work)
            self.home.write("param", chunk.index, full)

    def full_weights(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's whole working copy in fp32 on the host (a frozen chunk's weights: it has no
        master copy). Under ZeRO-3 every rank calls this (the shards are gathered)."""
        if chunk.resident:
            self._wait(chunk)
            full = chunk.payload
        elif self.shard_params:
            shard = torch.empty(chunk.shard_numel, dtype=chunk.dtype, device=self.device)
            self.home.read("param", chunk.index, shard)
            full = torch.empty(chunk.capacity, dtype=chunk.dtype, device=self.device)
            self._all_gather(full, shard)
        else:
            full = torch.empty(chunk.capacity, dtype=chunk.dtype, device=self.device)
            self.home.read("param", chunk.index, full)
        return full.float().cpu()

    def set_weights(self, chunk: Chunk, full: torch.Tensor) -> None:
        """Replace a frozen chunk's weights (`full`: the whole chunk) at home and on the device."""
        work = full.to(device=self.device, dtype=chunk.dtype)
        self.home.write("param", chunk.index, self._home_part(work, chunk))
        if chunk.resident:
            self._wait(chunk)
            chunk.payload.copy_(work)
        chunk.dirty = False

    def wait(self, chunk: Chunk) -> None:
        """Until the chunk's transfer in flight, if any, is done."""
        self._wait(chunk)

    def _wait(self, chunk: Chunk) -> None:
        future = self._pending.pop(chunk.index, None)
        if future is not None:


            t = time.perf_counter()
            future.result()
            self.stats.wait_seconds += time.perf_counter() - t

    def access(self, chunk: Chunk) -> None:
        """Make the chunk resident (waiting for its transfer), record the use, and prefetch."""
        self.tracer.record(chunk.index)
        self._clock += 1
        self.last_use[chunk.index] = self._clock
        if chunk.index in self._busy:
            self._settle(chunk)
        if chunk.index in self._pending:
            self.stats.prefetch_hits += 1
        elif not chunk.resident:
            self._make_room(chunk.nbytes, protect={chunk.index})
            self._start_fetch(chunk)
        self._wait(chunk)
        self.stats.peak_resident = max(self.stats.peak_resident, self.held_bytes)
        self._prefetch(chunk.index)

    def _prefetch(self, current: int) -> None:
        if self.prefetch_depth <= 0:
            return
        for index in self.tracer.upcoming(self.prefetch_depth + 1):
            chunk = self.chunks[index]
            if index == current or chunk.resident:
                continue
            self._drop_pooled_for(chunk.nbytes)
            if not self._fits(chunk.nbytes):
                # room only by evicting a chunk that is needed later than this one
                candidates = [c for c in self.chunks if c.evictable and c.index != current
                              and c.index not in self._pending and c.index not in self._busy
                              and self.tracer.next_use(c.index) > self.tracer.next_use(index)]
                if not candidates:
                    break
                self.evict(self._victim(candidates, chunk.nbytes))
                self._drop_pooled_for(chunk.nbytes)
                if not self._fits(chunk.nbytes):
                    break
            self._start_fetch(chunk)

    def _drop_pooled_for(self, nbytes: int) -> None:
        """Free pooled memory (other sizes first) until a fetch of `nbytes` fits, or none is left."""
        while self.pool is not None and not self._fits(nbytes) and self.pool.drop(keep=nbytes):
            pass

    def release(self, chunk: Chunk) -> None:
        self.policy.after_use(self, chunk)

    def evict_all(self) -> None:
        """Send every chunk that may leave home (nothing in use)."""
        for chunk in self.chunks:
            if chunk.evictable and chunk.index not in self._pending:
                self.evict(chunk)

    def enforce_budget(self) -> None:
        """Evict until the resident chunks fit the budget (and the static policy's share is off)."""
        for chunk in self.chunks:
            self.policy.after_use(self, chunk)
        self._make_room(0, protect=set())

    @contextmanager
    def traced_apart(self, passes: nn.Module | None = None) -> Iterator[Tracer]:
        """Chunk uses outside the training steps (validation, sampling) are traced on their own:
        the step's trace, which predicts the next step's order of use, stays the step's alone.
        `passes`: a module run again and again inside (a denoiser, once per sampling step); each
        of its forwards starts a new trace, so one pass predicts the next and its chunks are
        prefetched as in training."""
        saved, self.tracer = self.tracer, Tracer()
        started = False

        def new_pass(module, args) -> None:
            nonlocal started
            if started:
                self.tracer.end_step()          # the pass just done predicts this one
            else:                               # what ran before the first pass predicts nothing
                self.tracer.current = []
                started = True

        handle = passes.register_forward_pre_hook(new_pass) if passes is not None else None
        try:
            yield self.tracer
        finally:
            if handle is not None:
                handle.remove()
            self.tracer = saved

    def drain(self) -> None:
        """Wait for every update and every transfer in flight."""
        self.settle_all()
        for index in list(self._pending):
            self._wait(self.chunks[index])

    def end_step(self) -> None:
        self.drain()
        self.tracer.end_step()
