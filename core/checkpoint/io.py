"""The one checkpoint format of every plugin: the model and optimizer files of a folder.

    model.safetensors          the whole model's weights, unsplit (`core.checkpoint.weights`)
    optimizer.pt               the optimizer's state, when every rank holds the same one
    optimizer.tp0.pt, ...      one file per rank of the axes whose ranks hold different states
    optimizer.pp1.tp0.pt, ...  (`Sharding.split_by`, in that order)

Weights written in any layout load into any other, through any plugin, and into the plain
model with safetensors alone; optimizer states resume in the layout that wrote them. A plugin
says how its ranks hold the weights with a `Sharding` (`core.checkpoint.sharding`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.checkpoint.files import load_file, read_weights, save_file
from core.checkpoint.sharded import ShardReader, is_sharded
from core.checkpoint.sharding import Sharding
from core.checkpoint.weights import fit_weights, load_buffers, merge_ties, write_weights
from core.distributed import AXES
from core.errors import LoomError


class CheckpointIO:
    """Saves and loads a model and its optimizer in the format above; `sharding` says how the
    ranks hold them (by default every rank holds the whole model)."""

    MODEL = "model.safetensors"
    OPTIMIZER = "optimizer.pt"

    def __init__(self, sharding: Sharding | None = None) -> None:
        self.sharding = sharding or Sharding()

    def save_model(self, model: nn.Module, folder: Path, rank: int) -> None:
        """Every rank calls it (gathering the weights is a collective); rank 0 writes."""
        tensors = self.sharding.gather(model)
        if rank == 0:
            write_weights(Path(folder) / self.MODEL, tensors, merge_ties(self.sharding.ties(model)))

    def load_model(self, model: nn.Module, folder: Path) -> None:
        if is_sharded(folder):          # written by every rank: this rank reads its part
            self.sharding.load_shards(model, None, ShardReader(Path(folder)), None)
            return
        path = Path(folder) / self.MODEL
        weights = fit_weights(read_weights(path), model, merge_ties(self.sharding.ties(model)), path,
                              whole=self.sharding.whole)
        try:
            self.sharding.scatter(model, weights)
            load_buffers(model, weights)
        except (RuntimeError, IndexError) as e:
            raise LoomError(f"weights in {path} do not fit this model: {str(e).splitlines()[0]}") from None

    def _optimizer_file(self) -> str:
        axes, mesh = self.sharding.split_by, self.sharding.mesh
        if not axes:
            return self.OPTIMIZER
        return "optimizer." + ".".join(f"{a}{mesh.rank(a)}" for a in axes) + ".pt"

    def _writes_optimizer(self, rank: int) -> bool:
        """One rank of each group that holds the same state writes it."""
        mesh = self.sharding.mesh
        if mesh is None:
            return rank == 0
        return all(mesh.rank(a) == 0 for a in AXES if a not in self.sharding.split_by)

    def save_optimizer(self, optimizer: torch.optim.Optimizer, folder: Path, rank: int) -> None:
        """Every rank calls it (a sharded optimizer gathers its state)."""
        state = optimizer.state_dict()
        if self._writes_optimizer(rank):
            save_file(state, Path(folder) / self._optimizer_file())

    def load_optimizer(self, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        path = Path(folder) / self._optimizer_file()
        axes = self.sharding.split_by
        if axes and not path.is_file():
            keys = " and ".join(f"parallel.{a}" for a in axes)
            raise LoomError(f"{path} is missing: optimizer states are saved per rank of {keys}, so a run resumes "
                            f"with the same {keys}; to change {'them' if len(axes) > 1 else 'it'}, start a fresh "
                            f"run from its weights with train.init_weights={folder}")
        state = load_file(path)
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError) as e:
            raise LoomError(f"optimizer state in {folder} does not fit this model/optimizer: {e}") from None
