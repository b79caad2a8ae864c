"""The chunk optimizer: AdamW, LAMB or LARS over chunks, as the trainer steps it.

It stands in for a torch optimizer (its `origin`, which gives the update rule, the hyperparameter
groups and the learning-rate schedule) on parameters whose weights, gradients and optimizer
states live in chunks (`core.memory`). The states, fp32 master weights and moments for this
rank's shard of every chunk, are `core.zero.states.ChunkStates` (its `optim`, what a checkpoint
saves). A step walks the chunks in order; for each, it brings the states and the gradient shard
in, steps every parameter's part of the shard with the origin's rule (`core.zero.rules`, through
the functions of `core.optim`: AdamW as the C++ CPU Adam with the clip factor and the loss scale
folded into its gradient scale, so they cost no extra pass; LAMB and LARS in two passes around
the parameters' norms), writes the states back and hands the new weights to the chunk manager,
which puts them where the working copy lives (and gathers them from the other ranks).

It offers what the trainer uses of an optimizer wrapper (`core.booster.plugin.OptimizerWrapper`):
`backward`, `clip_grad_norm`, `step`, `zero_grad`, `param_groups` (the learning-rate schedule
writes into them), `skipped_steps`, `state_dict` / `load_state_dict`, and `optim`.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from core.memory.chunk import Chunk
from core.memory.manager import ChunkManager
from core.memory.state import TensorState
from core.memory.store import Store
from core.optim.norms import clip_coef, sum_of_squares, sum_over
from core.zero.gradients import GradientShards
from core.zero.rules import AdamW, Rule
from core.zero.states import KINDS, ChunkStates
from loom_kernels.cpu_adam import load as load_kernel

S = TensorState


class ChunkOptimizer:
    MAX_INFLIGHT = 2       # chunk updates queued on the optimizer thread during backward
    LOOKAHEAD = 1          # a step after backward: chunks whose states are read while one updates...
    WRITING = 0            # ... and earlier chunks whose states may still be being written

    def __init__(self, manager: ChunkManager, param_groups: list[dict], states: Store, grads: GradientShards,
                 precision: str = "fp32", origin: torch.optim.Optimizer | None = None,
                 in_backward: bool = False, rule: Rule | None = None) -> None:
        self.manager = manager
        self.origin = origin                 # the torch optimizer whose groups (and schedule) these are
        self.rule = rule or AdamW()
        self.optim = ChunkStates(manager, param_groups, states, precision)   # what a checkpoint saves
        self.states = states
        self.grads = grads
        self.scaler = self.optim.scaler
        self._clip = 1.0
        self.in_backward = in_backward
        self.average = None                  # a ChunkEMA blended during the step (it sets itself here)
        # Steps inside backward run on one optimizer thread, so that their disk reads and writes
        # overlap the rest of backward; with several ranks they stay on the main thread, where
        # the collectives of the update (gathering the new weights) keep the same order on all.
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="loom-adam")
                        if in_backward and manager.world == 1 else None)
        self._inflight: deque = deque()
        if not self.rule.needs_norms and getattr(states, "device", torch.device("cpu")).type == "cpu":
            load_kernel()      # a first compile happens now, not inside the first (timed) step
        if in_backward:
            if precision == "fp16":
                raise ValueError("a step inside backward cannot be skipped on fp16 overflow; use bf16 or fp32")
            grads.sink = self.update_in_backward

    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups

    @property
    def step_count(self) -> int:
        return self.optim.step_count

    @property
    def skipped_steps(self) -> int:
        return self.optim.skipped_steps

    # ------------------------------------------------------------------ the step

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scaler.scale if self.scaler.enabled else loss).backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip this step's gradient to the global norm `max_norm` (the factor is applied with the
        update); returns the norm before clipping. The norm counts each value once over the dp
        shards and the tp parts, from the squares the gradient shards kept (`core.optim.norms`)."""
        norm = torch.tensor(math.sqrt(self.grads.total_sq()) / self.scaler.scale, dtype=torch.float64)
        self._clip = float(clip_coef(norm, max_norm))
        return norm.float()

    def step(self) -> bool:
        """One step of the rule; False if fp16 gradients overflowed and the step was skipped."""
        self.manager.end_step()
        if self.in_backward:          # every chunk was updated when its gradient was complete
            self.optim.step_count += 1
            self._announce_step()
            return True
        if self.scaler.enabled and not math.isfinite(self.grads.total_sq()):
            self.scaler.update(True)
            self.optim.skipped_steps += 1
            self._clip = 1.0
            return False
        self.optim.step_count += 1
        grad_scale = self._clip / self.scaler.scale
        if self.rule.needs_norms:
            self._two_pass_step(grad_scale)
        else:
            self._streamed_step(grad_scale)
        self.scaler.update(False)
        self._clip = 1.0
        self._announce_step()
        return True

    def _streamed_step(self, grad_scale: float) -> None:
        """The rule's one pass (AdamW) over every chunk with a gradient. With the states in files
        the step is a pipeline: the next `LOOKAHEAD` chunks' states and gradients are being read
        while this chunk updates, and the last `WRITING` chunks' writes go on meanwhile, so
        the step takes about as long as its disk traffic, not the sum of reads, update and writes
        chunk after chunk. Each chunk in flight holds its states (4-5 shards of fp32): on SD v1.5
        with 64 MB chunks, one more chunk writing behind raised the step's peak by 0.4 GiB, more
        than the time it saved."""
        step = self.step_count
        todo = [c for c in self.manager.chunks if c.index in self.grads.seen]
        if self.states.in_memory:
            for chunk in todo:
                self._update(chunk, self.grads.get(chunk), step, grad_scale)
            return
        if self.manager.device.type == "cpu":
            # host memory is the device: the working copies still resident would share it with
            # the states the step reads, and the step needs none of them (the forward brings
            # them back, prefetched)
            self.manager.evict_all()
        # A moving average of the weights (`core.zero.ema`) is blended here too, chunk by chunk,
        # rather than in a pass of its own that would read every master weight again.
        extra = self.average.begin_blend(step, todo) if self.average is not None else ()

        def start(chunk: Chunk):
            kinds = extra if extra and self.average.blends(chunk) else ()
            return self.optim.start_reads(chunk, kinds), self.grads.start_get(chunk)

        started: dict[int, tuple] = {}
        writes: deque = deque()
        try:
            for i, chunk in enumerate(todo):
                for ahead in todo[i + 1:i + 1 + self.LOOKAHEAD]:
                    if ahead.index not in started:
                        started[ahead.index] = start(ahead)
                reads, (grad, reading) = started.pop(chunk.index, None) or start(chunk)
                if reading is not None:
                    reading.result()
                writes.append(self._update(chunk, grad, step, grad_scale, reads, wait_writes=False))
                while len(writes) > self.WRITING:
                    for w in writes.popleft():
                        w.result()
        finally:       # nothing still reading into or writing from these buffers when the step ends
            for reads, (_, reading) in started.values():
                for f in reads[2] + ([reading] if reading is not None else []):
                    f.exception()
            for ws in writes:
                for w in ws:
                    w.exception()
        for ws in writes:
            for w in ws:
                w.result()

    def _announce_step(self) -> None:
        """Step the torch optimizer this one stands in for. It holds no gradients (the chunks do:
        `ChunkedModel` drops each parameter's `.grad` once it is in its chunk), so its step changes
        nothing, as torch optimizers skip parameters without one; but a learning-rate schedule built
        on it watches its `step` (torch's schedulers warn when they are stepped before their
        optimizer ever was) and so sees that a step was taken."""
        if self.origin is not None:
            self.origin.step()

    def _two_pass_step(self, grad_scale: float) -> None:
        """LAMB or LARS over chunk shards (states in memory). Pass 1 runs the rule's first half on
        every parameter's slices and sums their squares (|w|² and |partner|²) into the vector
        layout of `core.optim.lamb.layer_norms`; one all-reduce over the data-parallel axis makes
        them the whole parameters' (each element lives in exactly one rank's shard), and under
        tensor parallelism the origin's `norm_reducer` (`core.optim.split_norms`) adds the tp
        parts in one more; pass 2 applies the rule with those norms."""
        order = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        n, step, rule = len(order), self.step_count, self.rule
        sums = _PerDevice(2 * n)
        todo = []
        for chunk in self.manager.chunks:
            if chunk.index not in self.grads.seen:
                continue
            grad = self.grads.get(chunk)
            master, m, v = (self.optim.get(kind, chunk) for kind in KINDS)
            parts = []
            for param, group, s in self.optim.slices(chunk):
                g, w, i = grad[s].float() * grad_scale, master[s], order[param]
                sums.add(i, sum_of_squares(w))
                sums.add(n + i, sum_of_squares(rule.partner(w, g, m[s], v[s], step, group)))
                parts.append((group, s, g, i))
            todo.append((chunk, master, m, v, parts))
        squares = sum_over(sums.total(), (self.manager.axis,))
        reducer = getattr(self.origin, "norm_reducer", None)
        if reducer is not None:
            squares = reducer(squares)
        norms = squares.cpu().sqrt()
        for chunk, master, m, v, parts in todo:
            for group, s, g, i in parts:
                rule.apply(master[s], g, m[s], v[s], step, group, norms[i], norms[n + i])
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
        reads = self.optim.start_reads(chunk)
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

    def _update(self, chunk: Chunk, grad: torch.Tensor, step: int, grad_scale: float, reads=None,
                wait_writes: bool = True) -> list[Future]:
        """One pass of the rule over the chunk's shard (AdamW), its states read and written back."""
        if reads is None:
            reads = self.optim.start_reads(chunk)
        if reads is None:                    # in-memory states: update the slots in place
            master, m, v = (self.optim.get(kind, chunk) for kind in KINDS)
        else:
            own_master, bufs, futures = reads
            for f in futures:
                f.result()
            master = chunk.payload if own_master else bufs["master"]
            m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
        low = None if chunk.dtype == torch.float32 else torch.zeros(chunk.shard_numel, dtype=chunk.dtype,
                                                                        device=master.device)
        for _, group, s in self.optim.slices(chunk):
            self.rule.update(master[s], grad[s], m[s], v[s], step, group, None if low is None else low[s], grad_scale)
        writes = []
        if reads is not None:                # files: all writes in flight at once
            writes = [self.states.write_async(kind, chunk.index, buf) for kind, buf in zip(KINDS, (master, m, v))]
            average = bufs.get(self.average.kind) if self.average is not None else None
            if average is not None:          # the moving average, blended while its chunk is here
                self.average.blend(chunk, master, average)
                writes.append(self.states.write_async(self.average.kind, chunk.index, average))
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

    # ------------------------------------------------------------------ checkpoints (ChunkStates')

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state)

    def master_state(self) -> dict[str, torch.Tensor]:
        return self.optim.master_state()

    def load_master(self, weights: dict[str, torch.Tensor]) -> None:
        self.optim.load_master(weights)


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
