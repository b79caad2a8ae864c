"""The one call between an app and the engine: `with session(recipe) as s:`.

An app describes its recipe, its model (a factory), its data and a `TrainTask`; the session
decides everything about how the model is spread:

    with session(cfg) as s:
        model = s.build(lambda par: MyModel(cfg.model, par.tensor, par.sequence))
        summary = s.fit(TrainTask(model=model, loss_fn=..., train_data=...))
        for part in s.weights(model):    # the weights, a chunk at a time: exports of any size
            ...
        model = s.export(model)          # or ordinary parameters again, for sampling

`session` checks the whole layout (`core.layout.check_layout`) and the run folder before any
process group is joined, so a bad recipe fails at once on every rank; then it joins the job,
builds the mesh and picks the plugin. `build` makes the model as the plugin needs it (on the meta
device, materialised chunk by chunk, when parameters are sharded or offloaded) with the
tensor-parallel mode and sequence parallelism the recipe asks for; `fit` trains it; `weights`
hands the trained weights back a part at a time, `export` as ordinary parameters. The app never names a plugin, a stage or a mode.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from core.booster import Plugin, make_plugin
from core.checkpoint.sharding import SplitDraw
from core.config import Recipe
from core.distributed import ParallelMesh, Runtime, detect, launch
from core.layout import AXES, BatchPlan, check_layout
from core.memory.recompute import Recompute
from core.run_folder import check_run_folder
from core.sequence import SequenceParallel
from core.tensor import OneD, TPMode, make_mode
from core.trainer import Trainer, TrainTask


@dataclass(frozen=True)
class ModelParallel:
    """What a model's layers need to split themselves, handed to the app's model factory:
    the tensor-parallel mode of `core.tensor`'s layers (on one rank, the mode in which every
    layer computes what its torch.nn counterpart does), the sequence-parallel attention of
    `core.sequence` (None where the recipe does not split sequences), and `recompute`, what a
    model calls instead of `torch.utils.checkpoint.checkpoint` to checkpoint a block
    (`core.memory.recompute`: it also works when the weights live in chunks)."""

    tensor: TPMode
    sequence: SequenceParallel | None = None
    recompute: Recompute | None = None     # activation checkpointing that knows where the weights live


class Session:
    def __init__(self, recipe: Recipe, runtime: Runtime, mesh: ParallelMesh, plugin: Plugin,
                 batch: BatchPlan) -> None:
        self.recipe = recipe
        self.runtime = runtime
        self.mesh = mesh
        self.plugin = plugin
        self.batch = batch
        self.trainer: Trainer | None = None

    def log(self, message: str) -> None:
        """Print on rank 0 only."""
        if self.mesh.is_main:
            print(message, file=sys.stderr)

    # ---------------------------------------------------------------- what the layout allows

    @property
    def forward_on_one_rank(self) -> bool:
        """One rank may run the model alone between steps (validation on rank 0)."""
        return self.plugin.forward_on_one_rank()

    def average(self, module: nn.Module, decay: float):
        """An exponential moving average of `module`'s trained weights, wherever they live
        (`core.ema.EMA`, or kept with the optimizer states when they are in chunks:
        `core.zero.ema.ChunkEMA`). Call `update()` after each step (a `TrainTask.on_step`); every
        rank enters `swapped_in()` and calls `use_average()`. Ask before `fit`."""
        return self.plugin.average(module, decay)

    @property
    def recompute(self) -> Recompute:
        """Activation checkpointing for this run's layout: `recompute(block, *args)` in place of
        `torch.utils.checkpoint.checkpoint`; for a diffusers model,
        `model.enable_gradient_checkpointing(s.recompute)`."""
        return self.plugin.recompute

    def autocast(self):
        """The run's mixed-precision context, for work the app does outside the trainer."""
        return self.plugin.precision.autocast()

    # ---------------------------------------------------------------- the model's life

    def build(self, factory: Callable[[ModelParallel], nn.Module]) -> nn.Module:
        """The model, made by `factory(parallel)` as the layout needs it.

        Where the plugin shards parameters or moves them off the device, the model is made on
        the meta device and each parameter is created where it will live, by the model's
        `init_parameter(name, tensor)` (a model without one is made normally)."""
        par = self._parallel()
        model = None
        if self.plugin.builds_on_meta():
            with torch.device("meta"):
                model = factory(par)
            init = getattr(model, "init_parameter", None)
            if init is None:
                model = None
            else:
                self.plugin.materialize = SplitDraw(model, init)
        return model if model is not None else factory(par)

    def _parallel(self) -> ModelParallel:
        p, mesh = self.recipe.parallel, self.mesh
        tensor, sequence = OneD.serial(), None
        if mesh.size("tp") > 1:
            tensor = make_mode(p.tp_mode, mesh, p.tp_depth)     # its batch split: checked by check_layout
            self.log(f"tensor parallelism: {tensor.describe()}")
        if mesh.size("sp") > 1:
            sequence = SequenceParallel(mesh.axis("sp"), p.sp_mode)
            self.log(f"sequence parallelism: {p.sp_mode} attention over {sequence.size} ranks")
        return ModelParallel(tensor, sequence, self.recompute)

    def prepare(self, task: TrainTask, recipe: Recipe | None = None) -> Trainer:
        """The trainer for `task`, with the model and optimizer configured for the layout (the
        weights now live where the plugin keeps them: in chunks, say), before any step: for
        work that should run on the model as it will train (DreamBooth's class images rendered
        within the memory budget). `fit(task)` then trains this trainer."""
        self.trainer = Trainer(recipe or self.recipe, self.mesh, task, self.plugin)
        return self.trainer

    def fit(self, task: TrainTask, recipe: Recipe | None = None) -> dict:
        """Train `task` as the recipe says (`recipe`: the session's, or the app's resolved copy
        of it); returns the trainer's summary. The trainer stays at `self.trainer`."""
        if self.trainer is None or self.trainer.task is not task:
            self.prepare(task, recipe)
        return self.trainer.fit()

    def between_steps(self, passes: nn.Module | None = None):
        """A context for work on the model between training steps (validation, sampling, class
        images): where the weights live in chunks, their uses inside are kept out of the training
        steps' trace (which predicts the next step's order), and each forward of `passes` (the
        denoiser a sampler calls once per step) predicts the next one's, so its chunks are
        prefetched."""
        return self.plugin.between_steps(passes)

    def weights(self, module: nn.Module, trained_only: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """`module`'s weights after (or before) training, as a state dict in parts: unsplit, in
        full precision, on the host, one chunk at a time where the weights live in chunks, so
        that exporting a model never needs it whole in memory (`core.checkpoint.stream` writes
        the parts into one safetensors file). `trained_only`: just the trained parameters (a
        LoRA's adapters). Every rank iterates to the end (the parts are gathered)."""
        return self.plugin.weights(module, trained_only)

    def export(self, model: nn.Module) -> nn.Module:
        """`model` with ordinary full-precision parameters again (every rank calls this); for a
        model that does not fit in memory, write it from `weights` instead."""
        return self.plugin.unchunk(model)


@contextmanager
def session(cfg: Recipe, axes: Sequence[str] = AXES, what: str = "this app") -> Iterator[Session]:
    """Check the layout and the run folder, join the job for the block, and hand back the
    session. `axes`: the parallel axes the app's model can be spread over."""
    p = cfg.parallel
    check_run_folder(cfg.output, cfg.train)
    layout, batch = check_layout(cfg, detect().world_size, axes, what)
    with launch(p.device, p.backend, p.timeout_s) as rt:
        mesh = ParallelMesh.build(layout, rt.device)
        plugin = make_plugin(cfg, mesh)
        try:
            yield Session(cfg, rt, mesh, plugin, batch)
        finally:
            plugin.close()                 # scratch files of offloaded states go, even after an error
