"""The `pipeline` plugin: data x pipeline x tensor x sequence parallelism from one recipe, with
each stage's weights in the chunked engine (ZeRO 1-3, host / NVMe offload) when the recipe asks.

- Pipeline: the model lists its layers (`pipeline_layers()`, see `core.pipeline`); they are cut
  into parallel.pp x parallel.virtual_stages stages, this rank keeps its own (the others are
  pruned, so its optimizer holds only its stage's parameters) and runs the schedule's actions
  for each step (`execute_pipeline`).
- Tensor parallelism: the layers themselves are `core.tensor` layers built with the recipe's
  mode; a stage talks to the same tensor-parallel rank of its neighbours.
- Sequence parallelism: the layers split each sequence over the sp axis themselves
  (`core.sequence`); a stage sends its part of the activations to the same sp rank of the next.
- Data parallelism: after the step's backward, gradients are averaged over the dp x sp ranks in
  one flat all-reduce per stage (no DDP: a pipeline step runs many forwards and backwards).
- Tied weights (GPT's embedding and classifier, on the first and last stage): their gradients
  are summed between those two stages every step, so the copies stay equal.
- ZeRO and offload (`memory`: a `ZeroPlugin`): after pruning, the stage's parameters go into that
  plugin's chunks (made there from the meta device under ZeRO-3 or offload, so no rank ever holds
  the other stages' weights), the stage runner saves tensors through the chunk hooks, and each
  chunk's gradient is reduced over dp x sp once a step, in its virtual stage's last backward
  (ZeRO-1/2 without offload: the buffers stay on the device anyway), or as each micro-batch's
  backward completes it (accumulated in the shards; offload, budgets, ZeRO-3). A tied weight's
  copy sits alone in the first chunk on both ends, so their shards hold the same elements and
  are summed between the ends after the step.

Gradient clipping sees the whole model's norm: every stage's squared norm (tensor-parallel parts
counted once each, the tied copy on the last stage not at all) summed over pp and tp. Under fp16
the overflow verdict spans the stages: one stage's overflow skips the step on all.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from core.booster.plugin import ModelWrapper, OptimizerWrapper, Plugin
from core.checkpoint import CheckpointIO, Sharding
from core.checkpoint.sharding import SplitDraw, make_meta_parameters
from core.distributed.comm import all_reduce_, broadcast_
from core.errors import LoomError
from core.pipeline.engine import StageRunner, StepRecord, partition, prune
from core.pipeline.schedule import Action, build, check


class PipelineOptimizerWrapper(OptimizerWrapper):
    """The optimizer of one stage; its gradient norm is the whole model's: every stage's parts
    summed over pp (and tp), a tied weight counted once (`skip_in_norm`: the last stage's copy)."""

    def __init__(self, optim, model, scaler, tp_axis, pp_axis, skip_in_norm: set[int]) -> None:
        super().__init__(optim, model, scaler, tp_axis=tp_axis, agree=(pp_axis,))
        self.pp_axis = pp_axis
        self.skip_in_norm = skip_in_norm

    def _unscale(self) -> None:
        if self.scaler is not None and self.scaler.is_enabled() and not self._unscaled:
            # only the last stage scales a loss (the others receive scaled gradients): the scale
            # starts on a stage at its first use, which a loss would have been
            self.scaler.scale(torch.ones((), device=self.pp_axis.device))
        super()._unscale()

    def _grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        from core.optim.norms import global_norm, gradients

        counted = [p for p in params if id(p) not in self.skip_in_norm]
        return global_norm(gradients(counted, self.tp_axis), (self.tp_axis, self.pp_axis))


class PipelineSharding(Sharding):
    """Each rank holds its stage's parameters (its tp parts): they are gathered over tp, then
    collected over pp on the first stage; a weight tied between the first and the last stage
    (`pipeline_tied`) is one weight of the model. Optimizer states differ per (pp, tp) rank."""

    split_by = ("pp", "tp")
    whole = False                  # a stage holds only its own names

    def __init__(self, plugin: "PipelinePlugin") -> None:
        super().__init__(plugin.mesh)
        self.plugin = plugin

    def ties(self, model: nn.Module) -> list[tuple[str, ...]]:
        return super().ties(model) + [tuple(pair) for pair in self.plugin.tied]

    def local(self, model: nn.Module) -> dict[str, torch.Tensor]:
        inner = self.plugin.memory
        if inner is not None and inner.optimizer is not None:
            return inner.optimizer.master_state()          # the stage's chunks; a collective over dp x sp
        return super().local(model)

    def load_local(self, model: nn.Module, local: dict[str, torch.Tensor]) -> None:
        inner = self.plugin.memory
        if inner is not None and inner.optimizer is not None:
            inner.optimizer.load_master(local)
        else:
            super().load_local(model, local)

    def chunk_states(self):
        inner = self.plugin.memory
        return inner.optimizer.optim if inner is not None and inner.optimizer is not None else None

    def gather(self, model: nn.Module) -> dict[str, torch.Tensor]:
        import torch.distributed as dist

        state = super().gather(model)                    # this stage's part; collective over tp
        mesh = self.mesh
        if mesh.rank("dp") or mesh.rank("tp") or mesh.rank("sp"):
            return {}
        pp = mesh.axis("pp")
        parts = [None] * pp.size if pp.rank == 0 else None
        dist.gather_object({k: v.cpu().contiguous() for k, v in state.items()}, parts, dst=pp.global_rank(0),
                           group=pp.group)
        return {k: v for part in parts for k, v in part.items()} if pp.rank == 0 else {}


class PipelinePlugin(Plugin):
    name = "pipeline"
    supported_precisions = ("fp32", "bf16", "fp16")
    supported_devices = ("cpu", "cuda")
    pipelined = True

    def __init__(self, mesh, precision: str = "fp32", schedule: str = "1f1b", microbatches: int = 0,
                 virtual_stages: int = 1, partition_by: str = "layers", memory: Plugin | None = None) -> None:
        super().__init__(mesh, precision)
        # the chunked engine (`ZeroPlugin`: ZeRO, offload, a device budget) keeping this stage's
        # weights, gradients and optimizer states, or None (ordinary parameters, averaged over dp)
        self.memory = memory
        if memory is not None:
            if memory.precision.name != precision:
                raise ValueError("the pipeline and its memory plugin must share one precision")
            self.recompute = memory.recompute          # checkpointed blocks keep their chunks
            self.chunked = True
        self.materialize = None                         # set by the session for a model made on meta
        self.pp = mesh.axis("pp")
        self.schedule, self.virtual, self.partition_by = schedule, virtual_stages, partition_by
        self.microbatches = microbatches
        check(schedule, self.pp.size, microbatches or self.pp.size, virtual_stages)
        self.tied: list[tuple[str, str]] = []
        self.runner: StageRunner | None = None
        self.records: list[StepRecord] = []
        self.keep_records = False
        p = self.pp.size
        # the ranks of the first and last stage, which hold the tied weights' two copies
        self._ends = (mesh.subgroup("pp", (0, p - 1), "ends") if p > 2 else self.pp)
        # the ranks holding the same weights of a stage: dp, and sp (each computed its gradient from
        # its part of the sequences; averaging over both completes it, as under DDP)
        self.replicas = mesh.joint(("dp", "sp"))

    def describe(self) -> str:
        sched = self.schedule + (f" x{self.virtual} virtual" if self.virtual > 1 else "")
        line = f"{self.name} ({self.mesh.layout.describe()}, {sched}, {self.precision.name}, {self.mesh.device})"
        return line if self.memory is None else f"{line}, each stage in {self.memory.describe()}"

    def configure(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        if not hasattr(model, "pipeline_layers"):
            raise LoomError(f"{type(model).__name__} cannot be pipelined: it has no pipeline_layers() "
                            f"(see core.pipeline)")
        layers = model.pipeline_layers()
        self._check_ownership(model, layers)
        p, s, v = self.pp.size, self.pp.rank, self.virtual
        weights = None
        if self.partition_by == "params":
            weights = [sum(t.numel() for name in layer.modules for t in model.get_submodule(name).parameters())
                       for layer in layers]
        elif self.partition_by == "cost":
            weights = self._measure(model, layers)
        assignment = partition(layers, p * v, self.partition_by, weights)
        self.assignment = assignment
        mine = [assignment[c * p + s] for c in range(v)]
        keep = {i for stage in mine for i in stage}
        self.tied = list(getattr(model, "pipeline_tied", lambda: [])())
        prune(model, layers, keep)
        if self.memory is None:
            self._materialize(model)
            model.to(self.mesh.device)
        params = list(model.parameters())
        kept = {id(t) for t in params}
        # tied weights: the first stage's copy is named after its first use, the last stage's after
        # its second; the last stage's copy is left out of the gradient norm (counted once)
        by_name = dict(model.named_parameters(remove_duplicate=False))
        side = 0 if s == 0 else 1 if s == p - 1 else None
        self._side = side
        self._tied_names = [pair[side] for pair in self.tied if side is not None and pair[side] in by_name]
        self._tied_params = [by_name[n] for n in self._tied_names]
        skip = {id(t) for t in self._tied_params} if side == 1 else set()
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [t for t in group["params"] if id(t) in kept]
        if self.memory is not None:
            return self._configure_chunked(model, optimizer, layers, mine)
        self.runner = StageRunner([[layers[i] for i in stage] for stage in mine], self.pp,
                                  self.precision.autocast, params)
        wrapped = ModelWrapper(model, model, self.precision)
        opt = None
        if optimizer is not None:
            opt = PipelineOptimizerWrapper(optimizer, model, self.precision.make_scaler(),
                                           self.mesh.axis("tp"), self.pp, skip)
        return wrapped, opt

    def _draw(self, name: str, out: torch.Tensor) -> None:
        """The initial values of parameter `name` of a model made on meta: both copies of a tied
        weight start from the first one's values (a model draws each parameter by its name)."""
        as_name = {pair[1]: pair[0] for pair in self.tied}.get(name)
        if as_name is None:
            self.materialize(name, out)
        elif isinstance(self.materialize, SplitDraw):
            self.materialize(name, out, as_name)      # still split as this copy's layer splits it
        else:
            self.materialize(as_name, out)

    def _materialize(self, model: nn.Module) -> None:
        """Make the stage's own parameters, where the model was built on the meta device: each
        drawn by `materialize` (a tied weight's copy by its first name), in place (the optimizer
        and every module that shares it keep the same parameter object)."""
        unmade = [name for name, param in model.named_parameters() if param.is_meta]
        if unmade and self.materialize is None:
            raise LoomError(f"{unmade[0]} is on the meta device and nothing was given to initialise it")
        make_meta_parameters(model, self._draw, self.mesh.device)
        meta = [n for n, b in model.named_buffers() if b.is_meta]
        if meta:
            raise LoomError(f"{type(model).__name__} was made on the meta device but its buffers ({', '.join(meta[:3])}) "
                            f"have no values; give them values in __init__ outside the meta device, or build "
                            f"the model without init_parameter")

    def _configure_chunked(self, model: nn.Module, optimizer, layers, mine):
        """This stage's parameters go into the memory plugin's chunks (made there, from the meta
        device, when the model was built on it: a stage never holds the others' layers). A tied
        weight's copy gets a chunk of its own, first, so both ends shard it alike and sum its
        gradient shards after the step; the gradient norm and fp16's overflow verdict span the
        stages."""
        inner = self.memory
        if self.materialize is not None:
            inner.materialize = self._draw
        inner.alone = tuple(self._tied_names)
        inner.across = (self.pp,)
        wrapped, opt = inner.configure(model, optimizer)
        chunked = wrapped.module
        self.runner = StageRunner([[layers[i] for i in stage] for stage in mine], self.pp,
                                  self.precision.autocast, list(model.parameters()))
        self.runner.saved_hooks = (chunked._pack, chunked._unpack)
        # Where the gradients' buffers stay on the device anyway (ZeRO-1/2, no offload or budget),
        # each chunk's gradient is reduced once a step, by the virtual stage's last backward (the
        # pipeline's cool-down), not once per micro-batch; elsewhere each micro-batch reduces it, so
        # that no more than a chunk's gradient is held at once.
        self._chunked = chunked
        self._defer = (inner.stage in (1, 2) and inner.offload == "none" and not inner.memory.device_gb)
        if self._defer:
            self.runner.before_backward = lambda action, last: setattr(chunked, "defer_reduce", not last)
        # the chunk holding each tied copy (first in packing order, one each)
        self._tied_chunks = [inner.manager.where[p][0] for p in (dict(model.named_parameters(remove_duplicate=False))[n]
                                                                  for n in self._tied_names)]
        return wrapped, opt

    def _measure(self, model: nn.Module, layers) -> list[float]:
        """Each layer's forward + backward time on the model's sample input (median of 3, on the
        random streams of a forked generator), rank 0's figures broadcast so that every rank cuts
        the model the same way."""
        import statistics
        import time

        if not hasattr(model, "pipeline_sample"):
            raise LoomError(f"parallel.pp_partition=cost needs {type(model).__name__}.pipeline_sample() "
                            f"(an input for the first layer)")
        model.to(self.mesh.device)
        costs = []
        with torch.random.fork_rng(devices=[self.mesh.device.index or 0] if self.mesh.device.type == "cuda" else []):
            x = model.pipeline_sample().to(self.mesh.device)
            for layer in layers:
                if x.is_floating_point():
                    x = x.detach().requires_grad_(True)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    with self.precision.autocast():
                        y = layer.fn(x)
                    y.float().sum().backward()
                    if self.mesh.device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                costs.append(statistics.median(times))
                x = y.detach()
        model.zero_grad(set_to_none=True)
        out = torch.tensor(costs, dtype=torch.float64)
        broadcast_(out, self.mesh.world, 0)
        return out.tolist()

    @staticmethod
    def _check_ownership(model: nn.Module, layers) -> None:
        owned = [name for layer in layers for name in layer.modules]
        for pname, _ in model.named_parameters():
            if not any(pname == o or pname.startswith(o + ".") for o in owned):
                raise LoomError(f"parameter {pname} belongs to none of the model's pipeline layers")

    def checkpoint_io(self) -> CheckpointIO:
        return CheckpointIO(PipelineSharding(self))

    # what the memory plugin decides, where it keeps the stage's weights

    def builds_on_meta(self) -> bool:
        # a stage makes only its own layers' weights (timing every layer needs them all)
        if self.memory is not None:
            return self.memory.builds_on_meta()
        return self.partition_by != "cost"

    def average(self, module: nn.Module, decay: float):
        return super().average(module, decay) if self.memory is None else self.memory.average(module, decay)

    def unchunk(self, model: nn.Module) -> nn.Module:
        return model if self.memory is None else self.memory.unchunk(model)

    def between_steps(self, passes: nn.Module | None = None):
        return super().between_steps(passes) if self.memory is None else self.memory.between_steps(passes)

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()

    def report(self) -> str | None:
        return None if self.memory is None else self.memory.report()

    def actions(self, micro: int, train: bool = True) -> list[Action]:
        if not train:
            return [Action("F", i, c) for i in range(micro) for c in range(self.virtual)]
        return build(self.schedule, self.pp.size, self.pp.rank, micro, self.virtual)

    def execute_pipeline(self, batches, model: ModelWrapper, first_input: Callable[[Any], Any],
                         criterion: Callable[[Any, Any], torch.Tensor],
                         optimizer: OptimizerWrapper | None) -> torch.Tensor:
        """One step over the micro-batches `batches` (forward only when `optimizer` is None):
        gradients accumulated, tied copies and data-parallel ranks synchronised. Returns the mean
        loss over the micro-batches on every rank."""
        record = StepRecord() if self.keep_records else None
        train = optimizer is not None
        batches = list(batches)           # any iterable of micro-batches
        loss = self.runner.run(self.actions(len(batches), train), batches, first_input, criterion,
                               optimizer.backward if train else None, self.mesh.device, record)
        if record is not None:
            self.records.append(record)
        if train and self.memory is not None:
            self._chunked.defer_reduce = False
            self._chunked.flush()           # what no last backward reduced (chunks across virtual stages)
            self._sync_chunked_ties()
        elif train:
            self._sync_gradients(model.unwrap())
        value = loss if loss is not None else torch.zeros((), device=self.mesh.device)
        broadcast_(value, self.pp, self.pp.size - 1)
        return value

    def _sync_gradients(self, model: nn.Module) -> None:
        tied = {id(t) for t in self._tied_params}
        # A tied weight's copies must stay bitwise equal: their gradients are averaged over the
        # replicas in a buffer of their own (the same size and order on both end stages, so the
        # same summation order; inside each stage's flat buffer their offsets differ, and over 3+
        # ranks the order of a sum follows the offset), then summed between the two ends.
        self._average([t.grad for t in self._tied_params if t.grad is not None])
        for t in self._tied_params:
            if t.grad is not None:
                all_reduce_(t.grad, self._ends, "sum")
        self._average([t.grad for t in model.parameters() if t.grad is not None and id(t) not in tied])

    def _sync_chunked_ties(self) -> None:
        """The chunks reduced each gradient over dp x sp during backward; a tied weight's two
        copies (each alone in a chunk laid out alike) now add their shards between the two ends,
        the last stage's left out of the norm."""
        grads = self.memory.optimizer.grads
        for chunk in self._tied_chunks:
            grads.combine(chunk, self._ends, counted=self._side == 0)

    def _average(self, grads: list[torch.Tensor]) -> None:
        """Average `grads` over the ranks holding the same weights, in one flat all-reduce."""
        if self.replicas.size == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        all_reduce_(flat, self.replicas, "avg")
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
