"""AdamW over chunks: fp32 master weights and moments for this rank's shard of every chunk.

The states live in a `Store`: the compute device (nothing offloaded), host memory
(`parallel.offload=cpu`) or NVMe files (`parallel.offload=nvme`). A step walks the chunks in
order; for each, it brings the master shard, both moments and the gradient shard in, runs the
C++ CPU Adam over each parameter's part of the shard (its group's learning rate and weight
decay; the clip factor and the loss scale folded into the kernel's gradient scale, so they cost
no extra pass), writes the states back and hands the new weights to the chunk manager, which
puts them where the working copy lives (and gathers them from the other ranks).

It offers what the trainer uses of an optimizer wrapper: `backward`, `clip_grad_norm`, `step`,
`zero_grad`, `param_groups` (the learning-rate schedule writes into them), `state_dict`.
"""

from __future__ import annotations

import math
from collections import deque
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from core.distributed.comm import all_gather_into

from core.amp import LossScaler
from core.memory.chunk import Chunk
from core.memory.manager import ChunkManager
from core.memory.state import TensorState
from core.memory.store import Store
from core.zero.gradients import GradientShards
from kernels.cpu_adam import adam_step, load as load_kernel

S = TensorState
KINDS = ("master", "exp_avg", "exp_avg_sq")


def init_states(store: Store, chunk: Chunk, master_shard: torch.Tensor) -> None:
    """A chunk's first states: the master shard as given, moments at zero."""
    store.write("master", chunk.index, master_shard)
    zeros = torch.zeros_like(master_shard)
    for kind in ("exp_avg", "exp_avg_sq"):
        store.write(kind, chunk.index, zeros)


class ChunkAdam:
    MAX_INFLIGHT = 2       # chunk updates queued on the optimizer thread during backward
    def __init__(self, manager: ChunkManager, param_groups: list[dict], states: Store, grads: GradientShards,
                 precision: str = "fp32", origin: torch.optim.Optimizer | None = None,
                 in_backward: bool = False, rule: str = "adam", tp_axis=None) -> None:
        self.manager = manager
        self.tp_axis = tp_axis if tp_axis is not None and tp_axis.size > 1 else None   # parameters split over tp
        self.origin = origin                 # the torch optimizer whose groups (and schedule) these are
        self.param_groups = param_groups
        self.group_of = {p: g for g in param_groups for p in g["params"]}
        self.states = states
        self.grads = grads
        self.step_count = 0
        self.skipped_steps = 0
        self.scaler = LossScaler(precision == "fp16")
        self._clip = 1.0
        self.optim = self                     # what checkpoint IO reads
        self.in_backward = in_backward
        self.rule = rule                      # adam, or lamb / lars (per-parameter trust ratios)
        # Steps inside backward run on one optimizer thread, so that their disk reads and writes
        # overlap the rest of backward; with several ranks they stay on the main thread, where
        # the collectives of the update (gathering the new weights) keep the same order on all.
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="loom-adam")
                        if in_backward and manager.world == 1 else None)
        self._inflight: deque = deque()
        if rule == "adam" and getattr(states, "device", torch.device("cpu")).type == "cpu":
            load_kernel()      # a first compile happens now, not inside the first (timed) step
        if in_backward:
            if precision == "fp16":
                raise ValueError("a step inside backward cannot be skipped on fp16 overflow; use bf16 or fp32")
            grads.sink = self.update_in_backward

    # ------------------------------------------------------------------ state storage

    def _get(self, kind: str, chunk: Chunk) -> torch.Tensor:
        """The state shard: the slot itself in memory, a copy read from a file."""
        if self.states.in_memory:
            return self.states.view(kind, chunk.index)
        buf = torch.empty(chunk.shard_numel, dtype=torch.float32)
        self.states.read(kind, chunk.index, buf)
        return buf

    # ------------------------------------------------------------------ the step

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scaler.scale if self.scaler.enabled else loss).backward()

    def _grad_norm(self) -> float:
        if self.tp_axis is None:
            return math.sqrt(self.grads.total_sq()) / self.scaler.scale
        # Split parameters: each part once, however many tensor-parallel ranks hold it
        # (`tp_replicas`, as core.tensor.grad_norm_sq counts them), summed over dp and tp.
        from core.distributed.comm import all_reduce_

        sums = _PerDevice(1)
        for chunk in self.manager.chunks:
            if chunk.index in self.grads.seen:
                grad = self.grads.get(chunk)
                for param, _, s in self._slices(chunk):
                    replicas = getattr(param, "tp_replicas", self.tp_axis.size)
                    sums.add(0, grad[s].double().square().sum() / replicas)
        total = sums.total()
        for axis in (self.manager.axis, self.tp_axis):
            if axis is not None and axis.size > 1:
                total = all_reduce_(total.to(axis.device), axis, "sum").cpu()
        return math.sqrt(float(total)) / self.scaler.scale

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = self._grad_norm()
        self._clip = min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) else 1.0
        return torch.tensor(norm)

    def step(self) -> bool:
        """One AdamW step; False if fp16 gradients overflowed and the step was skipped."""
        self.manager.end_step()
        if self.in_backward:          # every chunk was updated when its gradient was complete
            self.step_count += 1
            self._mark_stepped()
            return True
        if self.scaler.enabled and not math.isfinite(self.grads.total_sq()):
            self.scaler.update(True)
            self.skipped_steps += 1
            self._clip = 1.0
            return False
        self.step_count += 1
        self._mark_stepped()
        grad_scale = self._clip / self.scaler.scale
        if self.rule != "adam":
            self._trust_step(grad_scale)
        else:
            for chunk in self.manager.chunks:
                if chunk.index in self.grads.seen:
                    self._update(chunk, self.grads.get(chunk), self.step_count, grad_scale)
        self.scaler.update(False)
        self._clip = 1.0
        return True

    def _slices(self, chunk: Chunk):
        """(parameter, its group, its part of this rank's shard of the chunk) for every trained
        parameter with elements in the shard."""
        shard = chunk.shard(self.manager.rank)
        for info in chunk.tensors:
            a, b = max(info.offset, shard.start), min(info.offset + info.numel, shard.stop)
            if a < b and info.param.requires_grad:
                yield info.origin, self.group_of[info.origin], slice(a - shard.start, b - shard.start)

    def _trust_step(self, grad_scale: float) -> None:
        """LAMB or LARS over chunk shards (states in memory). Pass 1 updates the moments and sums
        each parameter's squares over this rank's parts of it (|w|^2 and |u|^2 for LAMB, |w|^2 and
        |g|^2 for LARS) into the vector layout of `core.optim.lamb.layer_norms`; one all-reduce
        over the data-parallel axis makes them the whole parameters' (each element lives in
        exactly one rank's shard), and under tensor parallelism the optimizer's `norm_reducer`
        (`core.optim.split_norms`) adds the tp parts in one more; pass 2 takes the steps with the very formulas of
        `core.optim.lamb` / `core.optim.lars`."""
        from core.distributed.comm import all_reduce_
        from core.optim.lamb import lamb_direction, lamb_scale
        from core.optim.lars import lars_scale

        order = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        n, step = len(order), self.step_count
        sums = _PerDevice(2 * n)
        todo = []
        for chunk in self.manager.chunks:
            if chunk.index not in self.grads.seen:
                continue
            grad = self.grads.get(chunk)
            master, m, v = (self._get(kind, chunk) for kind in KINDS)
            parts = []
            for param, group, s in self._slices(chunk):
                g, w, i = grad[s].float() * grad_scale, master[s], order[param]
                sums.add(i, w.double().square().sum())
                if self.rule == "lamb":
                    beta1, beta2 = group["betas"]
                    m[s].mul_(beta1).add_(g, alpha=1.0 - beta1)
                    v[s].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                    sums.add(n + i, lamb_direction(m[s], v[s], w, step, group).double().square().sum())
                else:
                    sums.add(n + i, g.double().square().sum())
                parts.append((group, s, g, i))
            todo.append((chunk, master, m, v, parts))
        squares = sums.total()
        if self.manager.world > 1:
            axis = self.manager.axis
            squares = all_reduce_(squares.to(axis.device), axis, "sum").cpu()
        reducer = getattr(self.origin, "norm_reducer", None)     # tensor parallelism: core.optim.split_norms
        if reducer is not None:
            squares = reducer(squares.to(self.tp_axis.device if self.tp_axis is not None else "cpu")).cpu()
        norms = squares.sqrt()
        for chunk, master, m, v, parts in todo:
            for group, s, g, i in parts:
                w = master[s]
                if self.rule == "lamb":
                    u = lamb_direction(m[s], v[s], w, step, group)
                    w.sub_(u.mul_(lamb_scale(norms[i], norms[n + i], group)))
                else:                                  # LARS: the momentum buffer is the exp_avg slot
                    direction = g.add(w, alpha=group["weight_decay"]) if group["weight_decay"] else g.clone()
                    direction.mul_(lars_scale(norms[i], norms[n + i], group))
                    m[s].mul_(group["momentum"]).add_(direction)
                    w.sub_(m[s])
            self.manager.update_working(chunk, master if chunk.dtype == torch.float32 else master.to(chunk.dtype))

    def update_in_backward(self, chunk: Chunk, grad: torch.Tensor) -> None:
        """`memory.step_in_backward`: the chunk's gradient shard is complete; step it now, so no
        gradient is ever stored (the step's other chunks follow as backward reaches them).

        On one rank the update is a pipeline: its state reads start here, the optimizer thread
        runs the kernel when they are in, and its writes go on while the next chunk computes; the
        chunk stays busy (not evicted, not fetched) until the last write is done."""
        if self._worker is None:
            self._update(chunk, grad, self.step_count + 1, 1.0)
            return
        # Back-pressure: each update in flight holds its chunk's gradient and states, so when the
        # disk is slower than backward an unbounded queue would hold the whole model's.
        while len(self._inflight) >= self.MAX_INFLIGHT:
            self._inflight.popleft().result()
        done: Future = Future()
        reads = self._start_reads(chunk)
        self._worker.submit(self._update_then_signal, chunk, grad, self.step_count + 1, reads, done)
        self._inflight.append(done)
        self.manager.mark_busy(chunk, done)

    def _update_then_signal(self, chunk: Chunk, grad: torch.Tensor, step: int, reads, done: Future) -> None:
        try:
            writes = self._update(chunk, grad, step, 1.0, reads, wait_writes=False)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the chunk
            done.set_exception(e)
            return
        if not writes:
            done.set_result(None)
            return
        left, lock = [len(writes)], threading.Lock()

        def finished(f: Future) -> None:
            with lock:
                if done.done():
                    return
                if f.exception() is not None:
                    done.set_exception(f.exception())
                    return
                left[0] -= 1
                if left[0] == 0:
                    done.set_result(None)

        for w in writes:
            w.add_done_callback(finished)

    def _mark_stepped(self) -> None:
        if self.origin is not None:   # tell a learning-rate schedule made for it that a step happened
            self.origin._opt_called = True

    def _master_is_payload(self, chunk: Chunk) -> bool:
        """The fp32 payload on the device is the master (no read from disk needed)."""
        m = self.manager
        if m.master_is_home and m.world == 1 and chunk.resident and self.states.name == "nvme":
            m.wait(chunk)
            return True
        return False

    def _start_reads(self, chunk: Chunk):
        """Start reading the chunk's states from files (None for in-memory stores, whose slots are
        used in place): (the payload is the master, buffers, futures)."""
        if self.states.in_memory:
            return None
        own_master = self._master_is_payload(chunk)
        kinds = KINDS[1:] if own_master else KINDS
        bufs = [torch.empty(chunk.shard_numel, dtype=torch.float32) for _ in kinds]
        return own_master, bufs, [self.states.read_async(k, chunk.index, b) for k, b in zip(kinds, bufs)]

    def _update(self, chunk: Chunk, grad: torch.Tensor, step: int, grad_scale: float, reads=None,
                wait_writes: bool = True) -> list[Future]:
        if reads is None:
            reads = self._start_reads(chunk)
        if reads is None:                    # in-memory states: update the slots in place
            master, m, v = (self._get(kind, chunk) for kind in KINDS)
        else:
            own_master, bufs, futures = reads
            for f in futures:
                f.result()
            master = chunk.payload if own_master else bufs[0]
            m, v = bufs[-2:]
        low = None if chunk.dtype == torch.float32 else torch.zeros(chunk.shard_numel, dtype=chunk.dtype,
                                                                        device=master.device)
        shard = chunk.shard(self.manager.rank)
        for info in chunk.tensors:
            a, b = max(info.offset, shard.start), min(info.offset + info.numel, shard.stop)
            if a >= b or not info.param.requires_grad:
                continue
            group = self.group_of[info.origin]
            s = slice(a - shard.start, b - shard.start)
            beta1, beta2 = group["betas"]
            adam_step(master[s], grad[s], m[s], v[s], None if low is None else low[s], lr=group["lr"],
                      beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                      adamw=True, step=step, grad_scale=grad_scale)
        writes = []
        if reads is not None:                # files: all writes in flight at once
            writes = [self.states.write_async(kind, chunk.index, buf) for kind, buf in zip(KINDS, (master, m, v))]
        self.manager.update_working(chunk, master if low is None else low)
        if wait_writes:
            for w in writes:
                w.result()
            return []
        return writes

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grads.reset()
        for chunk in self.manager.chunks:
            chunk.grad, chunk.grads_seen = None, 0
            for info in chunk.tensors:
                if info.state in (S.READY_FOR_REDUCE, S.HOLD_AFTER_FWD, S.HOLD_AFTER_BWD):
                    chunk.set_state(info, S.HOLD if chunk.resident else S.FREE)

    # ------------------------------------------------------------------ checkpoints

    def _full(self, kind: str, chunk: Chunk) -> torch.Tensor:
        shard = self._get(kind, chunk)
        if self.manager.world == 1:
            return shard
        axis = self.manager.axis
        full = torch.empty(chunk.capacity, dtype=shard.dtype, device=axis.device)
        return all_gather_into(full, shard.to(axis.device), axis)

    def _by_name(self, kind: str) -> dict[str, torch.Tensor]:
        out = {}
        for chunk in self.manager.chunks:
            full = self._full(kind, chunk).cpu()
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

    def _load(self, kind: str, chunk: Chunk, values: dict[str, torch.Tensor]) -> torch.Tensor:
        full = torch.zeros(chunk.capacity, dtype=torch.float32)
        for info in chunk.tensors:
            full[info.offset:info.offset + info.numel].copy_(values[info.name].reshape(-1))
        shard = full[chunk.shard(self.manager.rank)].clone()
        self.states.write(kind, chunk.index, shard)
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
                self._load(kind, chunk, state[kind])

    def load_master(self, weights: dict[str, torch.Tensor]) -> None:
        """Set master weights and working copies from full-precision weights by name."""
        for chunk in self.manager.chunks:
            shard = self._load("master", chunk, weights)
            self.manager.update_working(chunk, shard)


class _PerDevice:
    """Float64 sums of `size` slots kept on each device the chunks live on, so that adding a
    parameter's squares never waits for the device; `total()` brings them to the host once."""

    def __init__(self, size: int) -> None:
        self.size, self.sums = size, {}

    def add(self, slot: int, value: torch.Tensor) -> None:
        sums = self.sums.get(value.device)
        if sums is None:
            sums = self.sums[value.device] = torch.zeros(self.size, dtype=torch.float64, device=value.device)
        sums[slot] += value

    def total(self) -> torch.Tensor:
        out = torch.zeros(self.size, dtype=torch.float64)
        for sums in self.sums.values():
            out += sums.cpu()
        return out
