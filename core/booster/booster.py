"""`Booster(plugin).boost(...)`: one front for every parallel scheme."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from core.booster.plugin import ModelWrapper, OptimizerWrapper, Plugin
from core.checkpoint import load_file, save_file, write_atomically
from core.checkpoint.files import read_meta
from core.errors import LoomError


@dataclass
class Boosted:
    model: ModelWrapper
    optimizer: OptimizerWrapper | None
    criterion: Callable | None
    dataloader: Any
    scheduler: Any


class Booster:
    """Configures a model, optimizer and friends for `plugin`, then runs backward and
    checkpoints through it.

        booster = Booster(DDPPlugin(mesh, precision="bf16"))
        b = booster.boost(model, optimizer, criterion, dataloader, scheduler)
        loss = criterion(b.model(x), y)
        booster.backward(loss, b.optimizer)
        b.optimizer.step()
    """

    STATE = "state.pt"

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.mesh = plugin.mesh

    def boost(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
              criterion: Callable | None = None, dataloader: Any = None, scheduler: Any = None) -> Boosted:
        wrapped, opt = self.plugin.configure(model, optimizer)
        return Boosted(wrapped, opt, criterion, dataloader, scheduler)

    def backward(self, loss: torch.Tensor, optimizer: OptimizerWrapper) -> None:
        optimizer.backward(loss)

    def execute_pipeline(self, batches, model: ModelWrapper, first_input: Callable[[Any], Any],
                         criterion: Callable[[Any, Any], torch.Tensor],
                         optimizer: OptimizerWrapper | None) -> torch.Tensor:
        """One pipelined step over the micro-batches `batches` (any iterable; forward only without an
        optimizer); gradients end up accumulated and synchronised, ready for `optimizer.step()`.
        Returns the mean loss on every rank. Only the pipeline plugin has it."""
        if not getattr(self.plugin, "pipelined", False):
            raise LoomError(f"the {self.plugin.name} plugin does not pipeline; set parallel.pp > 1")
        return self.plugin.execute_pipeline(batches, model, first_input, criterion, optimizer)

    def no_sync(self, model: ModelWrapper) -> ContextManager:
        return self.plugin.no_sync(model)

    def save(self, folder: Path, model: ModelWrapper, optimizer: OptimizerWrapper | None = None,
             scheduler: Any = None, state: dict | None = None, rank_state: dict | None = None,
             add_files: Callable[[Path], None] | None = None, meta: dict | None = None) -> Path:
        """Write a complete checkpoint folder atomically.

        `state` is shared (written once), `rank_state` is this rank's own (each rank writes
        one, e.g. its RNG states), `add_files(tmp_folder)` lets rank 0 add files (a config, a
        tokenizer), `meta` goes into meta.json.
        """
        io = self.plugin.checkpoint_io()
        world = self.mesh.world

        def write(tmp: Path) -> None:
            io.save_model(model.unwrap(), tmp, world.rank)
            if optimizer is not None:
                io.save_optimizer(optimizer.optim, tmp, world.rank)
            if rank_state is not None:
                (tmp / "rng").mkdir(exist_ok=True)
                save_file(rank_state, tmp / "rng" / f"rank_{world.rank:05d}.pt")
            if world.rank == 0:
                scaler = optimizer.scaler if optimizer is not None else None
                save_file({"scheduler": scheduler.state_dict() if scheduler is not None else None,
                           "scaler": scaler.state_dict() if scaler is not None else None,
                           "state": state or {}}, tmp / self.STATE)
                if add_files is not None:
                    add_files(tmp)
                info = {"world_size": world.size, "layout": self.mesh.layout.__dict__,
                        "plugin": self.plugin.name, "precision": self.plugin.precision.name,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {})}
                (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")

        return write_atomically(Path(folder), write, world)

    def load(self, folder: Path, model: ModelWrapper, optimizer: OptimizerWrapper | None = None,
             scheduler: Any = None) -> tuple[dict, dict | None]:
        """Restore what `save` wrote; returns (state, this rank's rank_state or None).

        The rank state is None when the checkpoint came from a different number of processes.
        """
        folder = Path(folder)
        meta = read_meta(folder)
        io = self.plugin.checkpoint_io()
        io.load_model(model.unwrap(), folder)
        saved = load_file(folder / self.STATE)
        if optimizer is not None:
            io.load_optimizer(optimizer.optim, folder)
            if optimizer.scaler is not None and saved.get("scaler"):
                optimizer.scaler.load_state_dict(saved["scaler"])
        if scheduler is not None and saved.get("scheduler") is not None:
            scheduler.load_state_dict(saved["scheduler"])
        rank_file = folder / "rng" / f"rank_{self.mesh.world.rank:05d}.pt"
        same_world = meta.get("world_size") == self.mesh.world.size
        rank_state = load_file(rank_file) if same_world and rank_file.is_file() else None
        return saved.get("state", {}), rank_state
