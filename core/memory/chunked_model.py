"""Training with parameters, gradients and optimizer states spread over device, host and NVMe.

`ChunkedModel` runs a model whose parameters live in chunks (`ChunkManager`):

- before a module's forward its parameters' chunks are fetched (`COMPUTE`), after it they are
  done for now (`HOLD_AFTER_FWD`) and may be evicted;
- tensors that autograd saves for backward and that are views of a chunk (a Linear's weight) are
  noted by a saved-tensor hook, and the chunk is fetched again when backward unpacks them;
- each parameter's gradient, as soon as it is complete, is added into its chunk's fp32 gradient
  buffer and the parameter's `.grad` is dropped (`READY_FOR_REDUCE`); when the chunk has all its
  gradients (or backward ends), `on_grads(chunk)` reduces and stores them
  (`core.zero.GradientShards.reduce`, which adds each micro-batch's shard to the step's), and the
  chunk's tensors are free for the next forward again (gradient accumulation);
- a block checkpointed with `core.memory.recompute.Recompute` runs its forward again inside
  `recomputing()`, with the same hooks as the first forward, and its backward right after, so
  the weights it saved are fetched again when they are read. Torch's own checkpoint keeps the
  recomputed tensors out of these hooks (chunks could leave before the block's backward reads
  them), so a forward that starts inside backward outside that bracket is refused with what to
  use instead.

`core.zero.ChunkOptimizer` then updates the chunks' master weights and moments.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from core.errors import LoomError
from core.memory.chunk import Chunk
from core.memory.manager import ChunkManager
from core.memory.state import TensorState

S = TensorState


class ChunkedModel(nn.Module):
    def __init__(self, module: nn.Module, manager: ChunkManager, on_grads: Callable[[Chunk], None]) -> None:
        super().__init__()
        self.module = module
        self.manager = manager
        self.on_grads = on_grads
        self._in_backward = False
        self._node = None                     # the autograd node that last unpacked a chunk tensor
        self._pinned: list = []               # (chunk, tensor) it pinned
        self._recomputing = 0                 # depth of recompute brackets (see recomputing)
        # set (by a pipeline, between its micro-batches): complete gradients stay in their chunks'
        # buffers, adding up, until a backward with it unset (or `flush`) reduces them once
        self.defer_reduce = False
        self._handles = []
        for sub in module.modules():
            params = [p for p in sub.parameters(recurse=False) if p in manager.where]
            if params:
                self._handles.append(sub.register_forward_pre_hook(self._pre_forward(params)))
                self._handles.append(sub.register_forward_hook(self._post_forward(params)))
        for param in manager.where:
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(self._grad_ready))

    # ------------------------------------------------------------------ forward

    def _pre_forward(self, params):
        def hook(module, args):
            if not self._recomputing and torch._C._current_graph_task_id() != -1:
                raise LoomError(f"{type(module).__name__} runs its forward again inside backward (activation "
                                f"checkpointing through torch.utils.checkpoint), which chunked parameters cannot "
                                f"serve: the chunks may leave between the recomputation and its backward. "
                                f"Checkpoint with the session's recompute (ModelParallel.recompute; diffusers: "
                                f"model.enable_gradient_checkpointing(session.recompute))")
            for p in params:
                chunk, info = self.manager.where[p]
                self.manager.access(chunk)
                chunk.set_state(info, S.COMPUTE)
        return hook

    def _post_forward(self, params):
        def hook(module, args, output):
            done = {}
            for p in params:
                chunk, info = self.manager.where[p]
                chunk.set_state(info, S.HOLD_AFTER_FWD)
                done[chunk.index] = chunk
            for chunk in done.values():
                self.manager.release(chunk)
        return hook

    @contextmanager
    def recomputing(self) -> Iterator[None]:
        """The bracket of one checkpointed block's backward (`core.memory.recompute`): its forward
        runs again inside, as any forward does (chunks fetched and released per module, the
        weights it saves noted by the saved-tensor hooks), then its backward, which fetches them
        again per operation as the main backward does."""
        self._enter_backward()
        self._unpin()                  # a new node: the previous node's weights are free to go
        self._node = None
        self._recomputing += 1
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._recomputing -= 1
            self._unpin()
            self._node = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self.module(*args, **kwargs)

    # ------------------------------------------------------------------ backward

    def _pack(self, tensor: torch.Tensor):
        chunk = self.manager.chunk_of(tensor)
        if chunk is None:
            return tensor
        return (chunk, tensor)

    def _unpack(self, packed):
        if not isinstance(packed, tuple):
            return packed
        chunk, tensor = packed
        self._enter_backward()
        # A node unpacks all its saved tensors, then computes: what the previous node pinned is
        # free to go once another node starts unpacking.
        node = torch._C._current_autograd_node()
        if node is not self._node:
            self._unpin()
            self._node = node
        self.manager.access(chunk)
        info = self.manager.info_at(chunk, tensor.storage_offset())
        if info is not None and info.state is not S.READY_FOR_REDUCE:
            chunk.set_state(info, S.COMPUTE)
            self._pinned.append((chunk, info))
        return tensor

    def _enter_backward(self) -> None:
        """The first chunk use of a backward: `_backward_done` runs when it ends."""
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _unpin(self) -> None:
        pinned, self._pinned = self._pinned, []
        self._let_go(pinned)

    def _let_go(self, used: list) -> None:
        """Backward is done with these (chunk, tensor)s: those without a complete gradient wait
        as HOLD_AFTER_BWD, and their chunks may leave."""
        chunks = {}
        for chunk, info in used:
            if info.state is S.COMPUTE:          # used; its gradient (if any) is not complete yet
                chunk.set_state(info, S.HOLD_AFTER_BWD)
            chunks[chunk.index] = chunk
        for chunk in chunks.values():
            if chunk.resident:
                self.manager.release(chunk)

    def _grad_ready(self, param: nn.Parameter) -> None:
        chunk, info = self.manager.where[param]
        grad = chunk.grad_buffer()[info.offset:info.offset + info.numel]
        grad.add_(param.grad.detach().reshape(-1).to(device=grad.device, dtype=grad.dtype))
        param.grad = None
        chunk.set_state(info, S.READY_FOR_REDUCE)
        chunk.grads_seen += 1
        if chunk.grads_seen == chunk.grads_expected:
            self._reduce(chunk)
        if chunk.resident and all(t.state is not S.COMPUTE for t in chunk.tensors):
            self.manager.release(chunk)

    def flush(self) -> None:
        """Reduce every gradient still held in a chunk's buffer (see `defer_reduce`)."""
        for chunk in self.manager.chunks:
            if chunk.grad is not None:
                self.on_grads(chunk)

    def _backward_done(self) -> None:
        self._in_backward = False
        self._unpin()
        self._node = None
        for chunk in self.manager.chunks:
            if chunk.grads_seen:                 # some parameters of the chunk got no gradient
                self._reduce(chunk)
            for info in chunk.tensors:
                if info.state is S.COMPUTE:      # used in backward, no gradient (frozen)
                    chunk.set_state(info, S.HOLD_AFTER_BWD)
            if chunk.resident:
                self.manager.release(chunk)

    def _reduce(self, chunk: Chunk) -> None:
        """Hand the chunk's complete gradients on; its tensors are then free for the next
        forward (the next micro-batch of an accumulated step adds to the reduced shard). With
        `defer_reduce` the gradients stay in the chunk's buffer, and the next micro-batch's add
        to them."""
        if self.defer_reduce:
            chunk.grads_seen = 0
        else:
            self.on_grads(chunk)
        for info in chunk.tensors:
            if info.state is S.READY_FOR_REDUCE:
                chunk.set_state(info, S.HOLD if chunk.resident else S.FREE)
