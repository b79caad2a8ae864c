"""The zero plugin: parameters in chunks (`core.memory`), optimizer states (and gradients, and
parameters) sharded over the data-parallel ranks, and chunks offloaded to host memory or NVMe.

One engine, chosen by the recipe (`core.layout.chunked` says when a recipe runs on it):

| recipe                                | what is sharded over dp (x sp)  | where states live |
|---------------------------------------|---------------------------------|-------------------|
| `parallel.zero=1`                     | optimizer states                | device            |
| `parallel.zero=2`                     | + gradients (reduce-scatter)    | device            |
| `parallel.zero=3`                     | + parameters (gathered on use)  | device            |
| `parallel.offload=cpu/nvme` (+ `zero`)| as `zero` (3 when unset)        | host / NVMe       |
| `memory.device_gb>0`                  | as `zero`; chunks are evicted to fit the device budget | |

The ranks that share chunks are those holding the same weights: dp, and sp (sequence parallelism
splits the activations, not the weights). Under tensor parallelism each tp rank chunks its own
parts; under pipeline parallelism the pipeline plugin hands each stage's parameters to this one.

Checkpoints hold the fp32 master weights by parameter name (gathered from every rank), so they
load into a plain model and into any other layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from core.booster.plugin import ModelWrapper, Plugin
from core.checkpoint import CheckpointIO, Sharding
from core.checkpoint.sharding import unsplit
from core.checkpoint.weights import persistent_buffers
from core.config import MemoryConfig
from core.distributed import ParallelMesh
from core.errors import LoomError
from core.layout import check_chunk_rule
from core.memory.chunk import packing_order, plan_chunks, shard_used
from core.memory.chunked_model import ChunkedModel
from core.memory.manager import ChunkManager, human, make_policy
from core.memory.store import MemoryStore, NVMeStore
from core.optim.split_norms import attach as attach_split_norms
from core.zero import ChunkOptimizer, GradientShards
from core.zero.ema import ChunkEMA
from core.zero.states import KINDS, init_states


class ChunkSharding(Sharding):
    """The weights live in chunks: this rank's parameters (its tp parts) are the optimizer's fp32
    master weights, gathered over dp by name (`master_state`) and set back by name
    (`load_master`)."""

    def __init__(self, plugin: "ZeroPlugin") -> None:
        super().__init__(plugin.mesh)
        self.plugin = plugin

    def local(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.plugin.optimizer.master_state()          # a collective over dp

    def load_local(self, model: nn.Module, local: dict[str, torch.Tensor]) -> None:
        self.plugin.optimizer.load_master(local)

    def chunk_states(self):
        return self.plugin.optimizer.optim


class ZeroPlugin(Plugin):
    name = "zero"
    supported_precisions = ("fp32", "bf16", "fp16")
    supported_devices = ("cpu", "cuda")
    chunked = True

    def __init__(self, mesh: ParallelMesh, precision: str = "fp32", stage: int = 2, offload: str = "none",
                 memory: MemoryConfig | None = None, nvme_dir: str | Path = "",
                 materialize: Callable[[str, torch.Tensor], None] | None = None) -> None:
        super().__init__(mesh, precision)
        if stage not in (0, 1, 2, 3):
            raise LoomError(f"parallel.zero: got {stage}; allowed: 0, 1, 2, 3")
        if offload not in ("none", "cpu", "nvme"):
            raise LoomError(f"parallel.offload: got {offload!r}; allowed: none, cpu, nvme")
        self.stage = stage
        self.offload = offload
        self.memory = memory or MemoryConfig()
        self.nvme_dir = Path(nvme_dir or self.memory.nvme_dir or "nvme")
        self.materialize = materialize
        self.optimizer: ChunkOptimizer | None = None
        self.ema: ChunkEMA | None = None          # an average of the weights, kept with the states
        self.manager: ChunkManager | None = None
        # the ranks holding the same weights, over which states (and gradients, and parameters) are
        # sharded: dp, and sp (each sp rank computes its gradient from its part of the sequences,
        # and averaging over dp x sp completes it, as under DDP)
        self.replicas = mesh.joint(("dp", "sp"))
        # set by a plugin that runs this one on a part of the model (`PipelinePlugin`): parameters
        # packed first, each in a chunk of its own (tied across stages), and the axes whose ranks
        # hold the model's other parts (the gradient norm and fp16's overflow verdict span them)
        self.alone: tuple[str, ...] = ()
        self.across: tuple = ()

    def configure(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        if optimizer is None:
            raise LoomError(f"the {self.name} plugin needs the optimizer (it keeps the optimizer states itself)")
        from core.zero.rules import rule_for

        rule = rule_for(optimizer)
        if rule is None:
            raise LoomError(f"the {self.name} plugin trains with AdamW, LAMB or LARS (optim.name=adamw, cpu_adam, "
                            f"lamb or lars)")
        check_chunk_rule(rule.name, self.offload, self.memory.step_in_backward)
        device = self.mesh.device
        if not any(p.is_meta for p in model.parameters()):
            model.to(device)
        dp = self.replicas
        dtype = self.precision.dtype
        element = torch.tensor([], dtype=dtype).element_size()
        named = packing_order(list(model.named_parameters()), self.alone)   # the manager's order
        params = [p for _, p in named]
        chunk_numel = max(1, int(self.memory.chunk_mb * 2**20 / element))   # a larger parameter gets its own
        # never larger than what it holds: a model under memory.chunk_mb gets one chunk of its own
        # size, not 32 MiB mostly of padding to zero, send in every collective and step
        chunk_numel = min(chunk_numel, max(1, sum(p.numel() for n, p in named if n not in self.alone)))
        planned = plan_chunks([p.numel() for p in params], chunk_numel, [p.requires_grad for p in params], dp.size,
                              alone=sum(n in self.alone for n, _ in named))
        shard_params = self.stage == 3
        # The fp32 working copy is the fp32 master: one slot serves both, when each rank's home
        # copy is exactly its shard.
        alias = {"param": "master"} if dtype == torch.float32 and (dp.size == 1 or shard_params) else {}
        threads = self.memory.io_threads
        if self.offload == "nvme":
            mine = [shard_used(c.used, c.capacity, dp.size, dp.rank) for c in planned]
            stored = (KINDS + (("ema",) if self.ema is not None else ())
                      + (() if self.memory.step_in_backward else ("grad",)))
            largest = max((c.capacity for c in planned), default=dp.size) // dp.size    # elements per shard
            slots = {k: (len(planned), largest * 4) for k in stored}
            # a frozen chunk keeps no states on disk (its master slot, when it is the home copy, stays)
            keep = {k: [n * 4 if c.trained or (k == "master" and alias) else 0 for n, c in zip(mine, planned)]
                    for k in stored}
            if not alias:
                slots["param"] = (len(planned), (largest if shard_params else largest * dp.size) * element)
                keep["param"] = [n * element for n in (mine if shard_params else [c.used for c in planned])]
            folder = self.nvme_dir / f"rank{self.mesh.global_rank}"   # ranks may share a disk
            states = home = NVMeStore(folder, slots, threads=threads, aliases=alias, used=keep)
        else:
            pin = device.type == "cuda"
            if self.offload == "cpu":   # states and home copies both in host memory: one store
                states = home = MemoryStore(pin=pin, threads=threads, aliases=alias)
            else:                       # states on the device, home copies on the host
                states = MemoryStore(threads=threads, device=device)
                home = MemoryStore(pin=pin, threads=threads)
        budget = int(self.memory.device_gb * 2**30) if self.memory.device_gb > 0 else 2**62
        policy = make_policy(self.memory.policy, self.memory.static_fraction)
        self.manager = ChunkManager(model, chunk_numel, dtype, device, home, budget, policy, self.memory.prefetch,
                                    axis=dp, shard_params=shard_params, materialize=self.materialize,
                                    on_master=lambda chunk, shard: (init_states(states, chunk, shard)
                                                                    if chunk.trained else None),
                                    alone=self.alone)
        tp = self.mesh.axis("tp")
        grads = GradientShards(states, dp, stage=max(self.stage, 1), tp=tp,   # tp: each value once in the norm
                               across=self.across)
        # The same group dicts: the learning-rate schedule made for `optimizer` keeps steering them.
        attach_split_norms(optimizer, tp)          # LAMB / LARS on tensor-parallel parts: whole-parameter norms
        self.optimizer = ChunkOptimizer(self.manager, optimizer.param_groups, states, grads, self.precision.name,
                                   origin=optimizer, in_backward=self.memory.step_in_backward, rule=rule)
        self.wrapped = ChunkedModel(model, self.manager, grads.reduce)
        self.recompute.chunks = self.wrapped      # checkpointed blocks keep their chunks through backward
        if self.ema is not None:
            self.ema.start()
            self.optimizer.average = self.ema          # blended during each step where that saves reads
        return ModelWrapper(model, self.wrapped, self.precision), self.optimizer

    def average(self, module: nn.Module, decay: float) -> ChunkEMA:
        """An exponential moving average of `module`'s trained weights, kept as one more optimizer
        state (`core.zero.ema`); ask before the model is configured (its slots are planned then)."""
        if self.optimizer is not None:
            raise RuntimeError("ask for the average before training starts (its states are planned then)")
        self.ema = ChunkEMA(self, module, decay)
        return self.ema

    def builds_on_meta(self) -> bool:
        # where parameters are sharded or leave the device, the model need never exist whole
        return self.stage == 3 or self.offload != "none"

    def forward_on_one_rank(self) -> bool:
        # ZeRO-3 gathers each chunk from every data-parallel rank during a forward
        return not (self.stage == 3 and self.replicas.size > 1)

    def unchunk(self, model: nn.Module) -> nn.Module:
        """After training: give every parameter of `model` its own full-precision tensor again
        (from the master weights, gathered from all ranks: every rank must call this) and
        remove the chunk hooks, so that the model can be sampled from, exported or saved like
        any other. The chunks, their stores and the optimizer are released."""
        weights = self.optimizer.master_state()
        for handle in self.wrapped._handles:
            handle.remove()
        self.wrapped._handles.clear()
        self.recompute.chunks = None
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.data = weights[name].to(self.mesh.device)
        self.close()
        return model

    def weights(self, module: nn.Module, trained_only: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """`module`'s weights in fp32 on the host, one chunk at a time (trained chunks: the master
        weights, gathered over dp; frozen ones: their working copy), then its parameters that live
        outside chunks and its persistent buffers. No more than one chunk is gathered at once, so
        a model far larger than memory can be exported (`core.checkpoint.stream`). A part may be a
        view of a live buffer: copy what is kept past the next part. Every rank iterates."""
        if self.optimizer is None:           # not configured (yet): its parameters are ordinary
            yield from super().weights(module, trained_only)
            return
        names = {p: n for n, p in module.named_parameters()}
        m = self.manager
        for chunk in m.chunks:               # the same chunks, in the same order, on every rank
            mine = [info for info in chunk.tensors if info.param in names]
            if not mine or (trained_only and not chunk.trained):
                continue
            full = self.optimizer.optim.whole("master", chunk)
            yield unsplit(module, {names[i.param]: full[i.offset:i.offset + i.numel].view(i.param.shape)
                                   for i in mine})
        rest = {n: p.detach() for p, n in names.items() if p not in m.where and (p.requires_grad or not trained_only)}
        buffers = {} if trained_only else persistent_buffers(module)
        if rest or buffers:
            yield {**unsplit(module, rest), **buffers}

    def between_steps(self, passes: nn.Module | None = None):
        if self.manager is None:
            return super().between_steps(passes)
        return self.manager.traced_apart(passes)

    def close(self) -> None:
        stores = [self.manager.home, self.optimizer.states] if self.optimizer is not None else []
        for store in {id(s): s for s in stores}.values():
            store.close()

    def checkpoint_io(self) -> CheckpointIO:
        return CheckpointIO(ChunkSharding(self))

    def report(self) -> str | None:
        m = self.manager
        if m is None:
            return None
        st = m.stats
        line = (f"memory: peak {human(st.peak_resident)} of chunks on the device; {st.fetches} fetches "
                f"({human(st.bytes_in)} in, {st.prefetch_hits} prefetched), {st.evictions} evictions "
                f"({human(st.bytes_out)} written back), {st.wait_seconds:.1f} s waiting")
        home = m.home
        if isinstance(home, NVMeStore):
            line += (f"; NVMe {human(home.nbytes)} in {home.folder}: {human(home.bytes_read)} read, "
                     f"{human(home.bytes_written)} written")
        return line

    def describe(self) -> str:
        m = self.manager
        chunks = "chunks"
        if m:
            larger = [c.nbytes for c in m.chunks if c.nbytes > m.chunk_bytes]
            chunks = f"{len(m.chunks)} chunk{'s' if len(m.chunks) != 1 else ''} of {human(m.chunk_bytes)}" + (
                f" ({len(larger)} larger, up to {human(max(larger))}, for parameters larger than that)" if larger else "")
        budget = f"{self.memory.device_gb:g} GB device budget" if self.memory.device_gb else "no device budget"
        over = " x ".join(f"{a}={self.mesh.size(a)}" for a in ("dp", "sp") if a == "dp" or self.mesh.size(a) > 1)
        return (f"{self.name} (stage {self.stage} over {over}, {chunks}, {budget}, "
                f"offload={self.offload}, {self.precision.name}, {self.mesh.device})")
