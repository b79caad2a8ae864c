"""The chunk optimizer's states: what it keeps between steps, and what its checkpoints hold.

For this rank's shard of every trained chunk, an fp32 master copy of the weights and the two
moments (`KINDS`), in a `Store` (a frozen chunk keeps only its working copy, in the chunk manager's
home store): the compute device (nothing offloaded), host memory
(`parallel.offload=cpu`) or NVMe files (`parallel.offload=nvme`). Beside them: the step and
skipped-step counts, the fp16 loss scale, and the groups' hyperparameters (the very dicts of the
torch optimizer the states were made for, so that its learning-rate schedule keeps steering them).
How a step changes them is `core.zero.optimizer`'s business.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from core.amp import LossScaler
from core.distributed.comm import all_gather_into
from core.memory.chunk import Chunk, TensorInfo
from core.memory.manager import ChunkManager
from core.memory.store import Store, host_empty

KINDS = ("master", "exp_avg", "exp_avg_sq")


def init_states(store: Store, chunk: Chunk, master_shard: torch.Tensor) -> None:
    """A chunk's first states: the master shard as given, moments at zero."""
    store.write("master", chunk.index, master_shard)
    zeros = torch.zeros_like(master_shard)
    for kind in ("exp_avg", "exp_avg_sq"):
        store.write(kind, chunk.index, zeros)


def trained_slices(chunk: Chunk, rank: int) -> Iterator[tuple[TensorInfo, slice]]:
    """(tensor, its part of rank's shard of the chunk) for every trained parameter with elements
    in that shard."""
    shard = chunk.shard(rank)
    for info in chunk.tensors:
        a, b = max(info.offset, shard.start), min(info.offset + info.numel, shard.stop)
        if a < b and info.param.requires_grad:
            yield info, slice(a - shard.start, b - shard.start)


class ChunkStates:
    """This rank's optimizer states on the chunks. `state_dict` / `load_state_dict` are a
    checkpoint's optimizer state (counts, loss scale, hyperparameters, and the moments by
    parameter name, gathered from every rank); `master_state` / `load_master` the full-precision
    weights by name. Every rank takes part in each of them."""

    def __init__(self, manager: ChunkManager, param_groups: list[dict], store: Store,
                 precision: str = "fp32") -> None:
        self.manager = manager
        self.store = store
        self.param_groups = param_groups
        self.group_of = {p: g for g in param_groups for p in g["params"]}
        self.step_count = 0
        self.skipped_steps = 0
        self.scaler = LossScaler(precision == "fp16")

    def get(self, kind: str, chunk: Chunk) -> torch.Tensor:
        """The state shard: the slot itself in memory, a copy read from a file."""
        if self.store.in_memory:
            return self.store.view(kind, chunk.index)
        buf = host_empty(chunk.shard_numel)
        self.store.read(kind, chunk.index, buf)
        return buf

    def slices(self, chunk: Chunk) -> Iterator[tuple[nn.Parameter, dict, slice]]:
        """(parameter as the optimizer knows it, its group, its part of this rank's shard of the
        chunk) for every trained parameter with elements in the shard."""
        for info, s in trained_slices(chunk, self.manager.rank):
            yield info.origin, self.group_of[info.origin], s

    def _master_is_payload(self, chunk: Chunk) -> bool:
        """The fp32 payload on the device is the master (no read from disk needed)."""
        m = self.manager
        if m.master_is_home and m.world == 1 and chunk.resident and self.store.name == "nvme":
            m.wait(chunk)
            return True
        return False

    def start_reads(self, chunk: Chunk, extra: tuple[str, ...] = ()):
        """Start reading the chunk's states (and the `extra` kinds) from files (None for in-memory
        stores, whose slots are used in place): (the payload is the master, buffers by kind,
        futures)."""
        if self.store.in_memory:
            return None
        own_master = self._master_is_payload(chunk)
        kinds = (KINDS[1:] if own_master else KINDS) + extra
        bufs = {k: host_empty(chunk.shard_numel) for k in kinds}
        return own_master, bufs, [self.store.read_async(k, chunk.index, b) for k, b in bufs.items()]

    # ------------------------------------------------------------------ checkpoints

    def full(self, kind: str, chunk: Chunk) -> torch.Tensor:
        """The whole chunk's `kind` state (gathered over dp: every rank calls this)."""
        shard = self.get(kind, chunk)
        if self.manager.world == 1:
            return shard
        axis = self.manager.axis
        full = torch.empty(chunk.capacity, dtype=shard.dtype, device=axis.device)
        return all_gather_into(full, shard.to(axis.device), axis)

    def whole(self, kind: str, chunk: Chunk) -> torch.Tensor:
        """The whole chunk's `kind` state on the host; for "master", a frozen chunk's weights (it
        keeps nothing else). Every rank calls this."""
        return (self.full(kind, chunk) if chunk.trained else self.manager.full_weights(chunk)).cpu()

    def _by_name(self, kind: str) -> dict[str, torch.Tensor]:
        """The `kind` state of every parameter by name; a frozen chunk's weights for "master" (it
        keeps nothing else)."""
        out = {}
        for chunk in self.manager.chunks:
            if not chunk.trained and kind != "master":
                continue
            full = self.whole(kind, chunk)
            for info in chunk.tensors:
                out[info.name] = full[info.offset:info.offset + info.numel].clone().view(info.param.shape)
        return out

    def master_state(self) -> dict[str, torch.Tensor]:
        """Full-precision weights by parameter name (every rank takes part; every rank gets them)."""
        return self._by_name("master")

    def state_dict(self) -> dict:
        # the groups' hyperparameters as the schedule left them (lr), as torch optimizers save them
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"step": self.step_count, "skipped": self.skipped_steps, "scaler": self.scaler.state_dict(),
                "groups": groups, "exp_avg": self._by_name("exp_avg"), "exp_avg_sq": self._by_name("exp_avg_sq")}

    @staticmethod
    def _whole(chunk: Chunk, values: dict[str, torch.Tensor]) -> torch.Tensor:
        full = torch.zeros(chunk.capacity, dtype=torch.float32)
        for info in chunk.tensors:
            full[info.offset:info.offset + info.numel].copy_(values[info.name].reshape(-1))
        return full

    def _load(self, kind: str, chunk: Chunk, values: dict[str, torch.Tensor]) -> torch.Tensor:
        shard = self._whole(chunk, values)[chunk.shard(self.manager.rank)].clone()
        self.store.write(kind, chunk.index, shard)
        return shard

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
        self.skipped_steps = int(state.get("skipped", 0))
        self.scaler.load_state_dict(state["scaler"])
        if len(state["groups"]) != len(self.param_groups):
            raise ValueError(f"the saved optimizer has {len(state['groups'])} parameter groups, this one "
                             f"{len(self.param_groups)}")
        for group, saved in zip(self.param_groups, state["groups"]):
            group.update(saved)
        for chunk in self.manager.chunks:
            for kind in ("exp_avg", "exp_avg_sq"):
                if chunk.trained:
                    self._load(kind, chunk, state[kind])

    def load_master(self, weights: dict[str, torch.Tensor]) -> None:
        """Set master weights and working copies from full-precision weights by name."""
        for chunk in self.manager.chunks:
            if not chunk.trained:
                self.manager.set_weights(chunk, self._whole(chunk, weights))
                continue
            shard = self._load("master", chunk, weights)
            self.manager.update_working(chunk, shard)
