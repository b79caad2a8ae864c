"""Chunks: parameters packed into contiguous buffers that move as one (all of `memory.chunk_mb`,
but for a parameter larger than that, which gets a chunk of its own size).

A `Chunk` owns one flat `payload` tensor on the compute device. The parameters packed into it
are views of that payload, so moving the chunk moves them all: eviction copies the payload to
its home (host memory or an NVMe file) and frees its storage (`resize_(0)`: the parameters keep
their shapes, so autograd's bookkeeping is untouched); fetching restores the storage and copies
the bytes back. Each parameter's `TensorState` says whether the payload may leave.

Under data parallelism a chunk is split into `world` equal shards (its capacity is a multiple
of `world`); rank r owns elements [r * shard_numel, (r + 1) * shard_numel) of every chunk: their
optimizer states, their gradient after the reduction and, at ZeRO stage 3, their home copy.

Gradients do not stay in the parameters: as soon as one is complete it is added into the
chunk's fp32 gradient buffer (`grad`) and the parameter's `.grad` is dropped; once every
parameter of the chunk has its gradient, the buffer is reduced over the data-parallel ranks,
this rank's shard is handed to the optimizer and the buffer is freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from core.memory.store import _round_up, advise_huge_pages
from core.memory.state import EVICTABLE, IllegalTransition, TensorState, move


class PayloadPool:
    """The memory of evicted payloads, kept for the next chunk of the same size.

    A freed payload goes back to the OS and a fetched one comes as fresh pages, which the kernel
    zeroes as the read first touches them: streaming an OPT-6.7B through 2 GiB, that is 12 GB of
    pages made and unmade per token step, and a cold file read at 7.4 GB/s into fresh buffers
    against 9.4 GB/s into reused ones. With a pool, an evicted payload's memory moves (pointer and
    size, `UntypedStorage._swap_data_ptr_`) into a holder here and out again into the next
    payload of its size; the parameters keep viewing their own chunk's storage object throughout.
    The pool's bytes are held memory: the chunk manager counts them against its budget."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self.bytes = 0
        self.reused = 0                   # fetches served from the pool

    @staticmethod
    def usable() -> bool:
        return hasattr(torch.UntypedStorage, "_swap_data_ptr_")

    def has(self, nbytes: int) -> bool:
        return bool(self._free.get(nbytes))

    def put(self, storage: torch.UntypedStorage) -> None:
        """Take `storage`'s memory (leaving it empty)."""
        holder = torch.UntypedStorage(0, device=storage.device)
        storage._swap_data_ptr_(holder)
        self._free.setdefault(holder.nbytes(), []).append(holder)
        self.bytes += holder.nbytes()

    def take(self, storage: torch.UntypedStorage, nbytes: int) -> bool:
        """Give empty `storage` a kept buffer of `nbytes`; False if there is none."""
        kept = self._free.get(nbytes)
        if not kept:
            return False
        holder = kept.pop()
        self.bytes -= nbytes
        self.reused += 1
        storage._swap_data_ptr_(holder)
        return True

    def drop(self, keep: int = -1) -> int:
        """Free one kept buffer (of a size other than `keep` where there is one); its bytes."""
        sizes = [n for n, kept in self._free.items() if kept]
        if not sizes:
            return 0
        size = max((n for n in sizes if n != keep), default=sizes[0])
        self._free[size].pop()
        self.bytes -= size
        return size


def packing_order(named: list[tuple[str, nn.Parameter]], alone: tuple[str, ...] = ()
                  ) -> list[tuple[str, nn.Parameter]]:
    """The order parameters go into chunks: those named in `alone` first (each gets a chunk of its
    own, see `plan_chunks`), then the trained ones in the model's order, then the frozen ones (a
    chunk then holds only one kind: a frozen chunk needs no optimizer state, no gradient space,
    and may be stored in the working precision alone)."""
    first = [(n, p) for a in alone for n, p in named if n == a]
    rest = [(n, p) for n, p in named if n not in alone]
    return first + [(n, p) for n, p in rest if p.requires_grad] + [(n, p) for n, p in rest if not p.requires_grad]


class Planned(NamedTuple):
    used: int          # elements that hold parameters
    trained: bool      # its parameters are trained
    capacity: int      # elements (a multiple of the data-parallel world)
    count: int         # parameters


def plan_chunks(numels: list[int], capacity: int, trained: list[bool] | None = None,
                world: int = 1, alone: int = 0, breaks: list[bool] | None = None,
                trim: bool = False) -> list[Planned]:
    """How parameters of these sizes pack, in order, into chunks of `capacity` elements (rounded
    up to a multiple of `world`): a parameter never spans two chunks, and a trained and a frozen
    one never share one. A parameter larger than `capacity` gets a chunk of its own, of its size:
    one large matrix (a text encoder's 49 K x 768 token embedding) then does not make every chunk
    as large as itself, which would leave a small device budget room for only two or three.
    `trained`: per parameter (default: all). The first `alone` parameters get a chunk each, of
    their own size (a weight tied across pipeline stages: the same chunk, so the same shards, on
    both). `breaks`: per parameter, whether a new chunk starts at it (generation keeps each layer
    in chunks of its own); `trim`: every chunk only as large as what it holds (no padding to move
    or to hold)."""
    capacity = _round_up(max(1, capacity), world)
    chunks: list[Planned] = []
    for i, n in enumerate(numels):
        kind = True if trained is None else trained[i]
        last = chunks[-1] if chunks else None
        if (last is None or last.used + n > last.capacity or last.trained != kind or i <= alone
                or (breaks is not None and breaks[i] and last.used > 0)):
            # a parameter packed alone, or larger than a chunk, gets a chunk of its own size: a
            # tied weight's chunk is then the same on every stage whatever the stage's chunk size
            last = Planned(0, kind, capacity if n <= capacity and i >= alone else _round_up(n, world), 0)
            chunks.append(last)
        chunks[-1] = last._replace(used=last.used + n, count=last.count + 1)
    # the last chunk of a run of one kind holds what is left of it: no larger than that (a LoRA's
    # adapters, packed after the frozen weights, must not get a chunk as large as the model, with
    # states and gradient buffers to match)
    for i, c in enumerate(chunks):
        if trim or i + 1 == len(chunks) or chunks[i + 1].trained != c.trained:
            chunks[i] = c._replace(capacity=min(c.capacity, _round_up(max(c.used, 1), world)))
    return chunks


def shard_used(used: int, capacity: int, world: int, rank: int) -> int:
    """Elements of rank `rank`'s shard that hold parameters (the rest is padding)."""
    size = capacity // world
    return max(0, min(used - rank * size, size))


@dataclass
class TensorInfo:
    param: nn.Parameter
    name: str
    offset: int
    numel: int
    state: TensorState = TensorState.HOLD
    origin: nn.Parameter | None = None   # the parameter object the optimizer was built with

@dataclass
class Chunk:
    index: int
    capacity: int                      # elements
    dtype: torch.dtype                 # of the working copy (what forward and backward read)
    device: torch.device
    tensors: list[TensorInfo] = field(default_factory=list)
    used: int = 0
    resident: bool = True
    dirty: bool = True                 # payload differs from its home copy
    payload: torch.Tensor | None = None
    grad: torch.Tensor | None = None   # fp32, on the compute device; filled during backward
    world: int = 1                     # data-parallel ranks sharing the chunk
    grads_expected: int = 0            # parameters that want a gradient
    grads_seen: int = 0                # ... that have delivered one in this backward

    def __post_init__(self) -> None:
        if self.capacity % self.world:
            raise ValueError(f"chunk capacity {self.capacity} does not split into {self.world} shards")
        self.payload = torch.empty(self.capacity, dtype=self.dtype, device=self.device)
        advise_huge_pages(self.payload)
        self.payload.zero_()

    @property
    def shard_numel(self) -> int:
        return self.capacity // self.world

    def shard(self, rank: int) -> slice:
        return slice(rank * self.shard_numel, (rank + 1) * self.shard_numel)

    @property
    def nbytes(self) -> int:
        return self.capacity * self.dtype.itemsize

    def fits(self, numel: int) -> bool:
        return self.used + numel <= self.capacity

    @property
    def trained(self) -> bool:
        """Its parameters are trained (`packing_order` never mixes trained and frozen ones): it
        has optimizer states and gradients; a frozen chunk has only its weights."""
        return self.grads_expected > 0

    def append(self, name: str, param: nn.Parameter) -> TensorInfo:
        """Reserve room for `param` and make it a view of the payload (the caller fills in the
        values). A parameter on the meta device is replaced by a new one; `info.param` is the
        one the model now holds, `info.origin` the one it held before."""
        n = param.numel()
        if not self.fits(n):
            raise ValueError(f"{name} ({n} elements) does not fit chunk {self.index} "
                             f"({self.capacity - self.used} free)")
        view = self.payload[self.used:self.used + n].view(param.shape)
        if param.is_meta:
            new = nn.Parameter(view, requires_grad=param.requires_grad)
        else:
            param.data = view
            new = param
        info = TensorInfo(new, name, self.used, n, origin=param)
        self.tensors.append(info)
        self.used += n
        if param.requires_grad:
            self.grads_expected += 1
        return info

    # ------------------------------------------------------------------ states

    def set_state(self, info: TensorInfo, new: TensorState) -> None:
        info.state = move(info.state, new, f"{info.name} (chunk {self.index})")

    @property
    def evictable(self) -> bool:
        return self.resident and all(t.state in EVICTABLE for t in self.tensors)

    # ------------------------------------------------------------------ storage

    def free_payload(self, pool: PayloadPool | None = None) -> None:
        """Drop the device memory (or hand it to `pool`). The parameters keep their shapes
        (autograd's records stay valid) and read nothing until `alloc_payload`; their lifecycle
        states are kept except that held copies become FREE."""
        if not self.evictable:
            busy = [t.name for t in self.tensors if t.state not in EVICTABLE]
            raise IllegalTransition(f"chunk {self.index} cannot leave the device: {busy[:3]} in use")
        if pool is not None:
            pool.put(self.payload.untyped_storage())
        else:
            self.payload.untyped_storage().resize_(0)
        self.resident = False
        for t in self.tensors:
            if t.state is not TensorState.READY_FOR_REDUCE:
                self.set_state(t, TensorState.FREE)

    def alloc_payload(self, pool: PayloadPool | None = None) -> None:
        """Give the payload its memory back, from `pool` where it keeps a buffer of this size (the
        caller fills it)."""
        if pool is None or not pool.take(self.payload.untyped_storage(), self.nbytes):
            self.payload.untyped_storage().resize_(self.nbytes)
            advise_huge_pages(self.payload)     # fresh memory: fault it in by 2 MiB, not 4 KiB
        self.resident = True
        for t in self.tensors:
            if t.state is TensorState.FREE:
                self.set_state(t, TensorState.HOLD)

    def grad_buffer(self) -> torch.Tensor:
        if self.grad is None:
            self.grad = torch.empty(self.capacity, dtype=torch.float32, device=self.device)
            advise_huge_pages(self.grad)
            self.grad.zero_()
        return self.grad
