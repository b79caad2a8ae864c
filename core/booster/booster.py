"""`Booster(plugin)`: the one door between the training loop and a parallel scheme.

The trainer (and anything else that trains) talks to the Booster only: it wraps the model and the
optimizer (`boost`), runs backward and pipelined steps, skips gradient synchronisation between
accumulation micro-batches, makes each rank's data loader, and saves and loads checkpoints. What
a scheme supports is declared once, on the plugin (`core.booster.plugin.Plugin`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from core.booster.plugin import ModelWrapper, OptimizerWrapper, Plugin
from core.checkpoint import load_file, save_file, write_atomically
from core.checkpoint.background import BackgroundSave
from core.checkpoint.files import read_meta
from core.checkpoint.sharded import ShardReader, ShardWriter, is_sharded, merge, write_index
from core.checkpoint.weights import merge_ties
from core.errors import LoomError


@dataclass
class Boosted:
    model: ModelWrapper
    optimizer: OptimizerWrapper | None
    scheduler: Any


class Booster:
    """Configures a model, optimizer and friends for `plugin`, then runs backward and
    checkpoints through it.

        booster = Booster(DDPPlugin(mesh, precision="bf16"))
        b = booster.boost(model, optimizer, scheduler)
        loss = criterion(b.model(x), y)
        booster.backward(loss, b.optimizer)
        b.optimizer.step()
    """

    STATE = "state.pt"

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.mesh = plugin.mesh

    def boost(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
              scheduler: Any = None) -> Boosted:
        wrapped, opt = self.plugin.configure(model, optimizer)
        return Boosted(wrapped, opt, scheduler)

    @property
    def pipelined(self) -> bool:
        """Steps run through `execute_pipeline` (the model is cut into stages across ranks)."""
        return self.plugin.pipelined

    def describe(self) -> str:
        return self.plugin.describe()

    def report(self) -> str | None:
        return self.plugin.report()

    def prepare_dataloader(self, dataset, micro_batch: int, grad_accum: int, **kw):
        """This rank's share of every global batch (see `Plugin.prepare_dataloader`)."""
        return self.plugin.prepare_dataloader(dataset, micro_batch, grad_accum, **kw)

    def load_weights(self, model: ModelWrapper, folder: Path) -> None:
        """Only the weights of a checkpoint (a fresh run started from them, any layout)."""
        self.plugin.checkpoint_io().load_model(model.unwrap(), Path(folder))   # either format

    def backward(self, loss: torch.Tensor, optimizer: OptimizerWrapper) -> None:
        optimizer.backward(loss)

    def execute_pipeline(self, batches, model: ModelWrapper, first_input: Callable[[Any], Any],
                         criterion: Callable[[Any, Any], torch.Tensor],
                         optimizer: OptimizerWrapper | None) -> torch.Tensor:
        """One pipelined step over the micro-batches `batches` (any iterable; forward only without an
        optimizer); gradients end up accumulated and synchronised, ready for `optimizer.step()`.
        Returns the mean loss on every rank. Only the pipeline plugin has it."""
        if not self.plugin.pipelined:
            raise LoomError(f"the {self.plugin.name} plugin does not pipeline; set parallel.pp > 1")
        return self.plugin.execute_pipeline(batches, model, first_input, criterion, optimizer)

    def no_sync(self, model: ModelWrapper) -> ContextManager:
        return self.plugin.no_sync(model)

    def save(self, folder: Path, model: ModelWrapper, optimizer: OptimizerWrapper | None = None,
             scheduler: Any = None, state: dict | None = None, rank_state: dict | None = None,
             add_files: Callable[[Path], None] | None = None, meta: dict | None = None,
             format: str = "unsplit", background: bool = False,
             after: Callable[[], None] | None = None) -> Path | BackgroundSave:
        """Write a complete checkpoint folder atomically.

        `state` is shared (written once), `rank_state` is this rank's own (each rank writes
        one, e.g. its RNG states), `add_files(tmp_folder)` lets rank 0 add files (a config, a
        tokenizer), `meta` goes into meta.json. `format`: "unsplit" (rank 0 writes the whole
        model, `core.checkpoint.io`) or "sharded" (every rank writes what it owns of the weights
        and optimizer states, `core.checkpoint.sharded`; any layout loads it). `after` runs on
        rank 0 once the folder is in place (pruning older checkpoints).

        With `background` (sharded only) everything is captured now and the files are written by
        a thread while training goes on: the returned `BackgroundSave`'s `finish()` (every rank)
        waits for it and reports a failure.
        """
        if format not in ("unsplit", "sharded"):
            raise LoomError(f"checkpoint format {format!r}: choose unsplit or sharded")
        if background and format != "sharded":
            raise LoomError("train.checkpoint_async=true needs train.checkpoint_format=sharded (an unsplit "
                            "checkpoint is gathered on rank 0, which a background save cannot overlap)")
        io = self.plugin.checkpoint_io()
        world = self.mesh.world
        scaler = optimizer.scaler if optimizer is not None else None

        def capture() -> dict:
            """What the files will hold, taken now (the collectives run here, on every rank)."""
            got: dict = {"shared": None}
            if format == "sharded":
                writer = ShardWriter(copy=background)
                got["optimizer"] = io.sharding.save_shards(model.unwrap(), optimizer.optim if optimizer else None,
                                                           writer)
                parts = _gather_to_all(writer.part(world.rank), world)
                got["writer"] = writer
                if world.rank == 0:
                    ties = [list(g) for g in merge_ties(io.sharding.ties(model.unwrap()))]
                    got["index"] = merge(parts, world_size=world.size, layout=self.mesh.layout.__dict__,
                                         ties=ties, **(meta or {}))
            if world.rank == 0:
                shared = {"scheduler": scheduler.state_dict() if scheduler is not None else None,
                          "scaler": scaler.state_dict() if scaler is not None else None, "state": state or {}}
                if got.get("optimizer"):
                    shared["optimizer"] = got["optimizer"]
                got["shared"] = copy.deepcopy(shared) if background else shared
            return got

        def write_files(tmp: Path, got: dict) -> None:
            if format == "sharded":
                got["writer"].write(tmp, world.rank)
                if world.rank == 0:
                    write_index(tmp, got["index"])
            else:
                io.save_model(model.unwrap(), tmp, world.rank)
                if optimizer is not None:
                    io.save_optimizer(optimizer.optim, tmp, world.rank)
            if rank_state is not None:
                (tmp / "rng").mkdir(exist_ok=True)
                save_file(rank_state, tmp / "rng" / f"rank_{world.rank:05d}.pt")
            if world.rank == 0:
                save_file(got["shared"], tmp / self.STATE)
                if add_files is not None:
                    add_files(tmp)
                info = {"world_size": world.size, "layout": self.mesh.layout.__dict__,
                        "plugin": self.plugin.name, "precision": self.plugin.precision.name,
                        "format": format, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {})}
                (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")

        if background:
            got = capture()
            return BackgroundSave(Path(folder), lambda tmp: write_files(tmp, got), world, after)
        done = write_atomically(Path(folder), lambda tmp: write_files(tmp, capture()), world)
        if after is not None and world.rank == 0:
            after()
        return done

    def load(self, folder: Path, model: ModelWrapper, optimizer: OptimizerWrapper | None = None,
             scheduler: Any = None) -> tuple[dict, dict | None]:
        """Restore what `save` wrote; returns (state, this rank's rank_state or None).

        The rank state is None when the checkpoint came from a different number of processes.
        """
        folder = Path(folder)
        meta = read_meta(folder)
        io = self.plugin.checkpoint_io()
        saved = load_file(folder / self.STATE)
        if is_sharded(folder):
            io.sharding.load_shards(model.unwrap(), optimizer.optim if optimizer is not None else None,
                                    ShardReader(folder), saved.get("optimizer") if optimizer is not None else None)
        else:
            io.load_model(model.unwrap(), folder)
            if optimizer is not None:
                io.load_optimizer(optimizer.optim, folder)
        if optimizer is not None:
            if optimizer.scaler is not None and saved.get("scaler"):
                optimizer.scaler.load_state_dict(saved["scaler"])
        if scheduler is not None and saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        rank_file = folder / "rng" / f"rank_{self.mesh.world.rank:05d}.pt"
        same_world = meta.get("world_size") == self.mesh.world.size
        rank_state = load_file(rank_file) if same_world and rank_file.is_file() else None
        return saved.get("state", {}), rank_state


def _gather_to_all(part: dict, world) -> list[dict]:
    """Every rank's part of the sharded index (each rank gets the list)."""
    if world.size == 1:
        return [part]
    import torch.distributed as dist

    parts: list = [None] * world.size
    dist.all_gather_object(parts, part, group=world.group)
    return parts
