"""Data parallelism with torch's DistributedDataParallel (and the single-process case), and
under it tensor parallelism (any `core.tensor` mode) for models built on its layers.

With dp = 1 the model runs as it is. With dp > 1 it is wrapped in DDP over the mesh's `dp`
axis; DDP's gradient all-reduces go through a communication hook that counts them in the
mesh's `CommStats`, so the accounting covers what DDP sends too.
"""

from __future__ import annotations

from pathlib import Path
from typing import ContextManager

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from core.booster.plugin import ModelWrapper, OptimizerWrapper, Plugin
from core.checkpoint import CheckpointIO, load_file, read_weights, save_file
from core.errors import LoomError
from core.optim.split_norms import attach as attach_split_norms


def _tied_names_dropped(model: nn.Module) -> set[str]:
    """The names of tied parameters that safetensors' save_model leaves out (it keeps one name per
    shared tensor), so that both ways of saving write the same keys."""
    try:
        from safetensors.torch import _remove_duplicate_names
    except ImportError:   # keep the first name of each tied parameter
        kept = {name for name, _ in model.named_parameters()}
        return {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept
    return {name for dropped in _remove_duplicate_names(model.state_dict()).values() for name in dropped}


def read_serial_weights(folder, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """The unsplit weights file of a checkpoint folder, or one clear error."""
    path = Path(folder) / name
    return path, read_weights(path)


def load_serial_weights(model: nn.Module, saved: dict[str, torch.Tensor], path: Path) -> list[str]:
    """This rank's parts of unsplit weights into a model on `core.tensor` layers; the names it lacked."""
    from core.tensor import load_serial_state_dict

    try:
        return load_serial_state_dict(model, saved)
    except RuntimeError as e:
        raise LoomError(f"weights in {path} do not fit this model: {str(e).splitlines()[0]}") from None


def load_tied_serial_weights(model: nn.Module, saved: dict[str, torch.Tensor], path: Path) -> None:
    """`load_serial_weights`, refusing weights that lack a parameter (a tied parameter stored under
    another of its names is not missing)."""
    loaded = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in saved}
    by_name = dict(model.named_parameters(remove_duplicate=False))
    lacking = load_serial_weights(model, saved, path)
    missing = [n for n in lacking if id(by_name.get(n)) not in loaded]
    if missing:
        raise LoomError(f"weights in {path} do not fit this model: missing {missing[:5]}")


class TensorParallelCheckpointIO(CheckpointIO):
    """Weights as the unsplit state dict (gathered over the tp axis; one copy written), so that
    they load into a serial model or any other split; the optimizer's state per tp rank
    (`optimizer.tpR.pt`), for resuming in the same layout."""

    def __init__(self, mesh) -> None:
        self.mesh = mesh

    def save_model(self, model: nn.Module, folder, rank: int) -> None:
        from safetensors.torch import save_file as st_save_file

        from core.tensor import serial_state_dict

        state = serial_state_dict(model)          # a collective over tp: every rank takes part
        if rank == 0:
            unique = {k: v.contiguous() for k, v in state.items() if k not in _tied_names_dropped(model)}
            unique.update({k: v.detach().cpu().contiguous() for k, v in model.named_buffers()})
            st_save_file(unique, str(Path(folder) / self.MODEL))

    def load_model(self, model: nn.Module, folder) -> None:
        path, saved = read_serial_weights(folder, self.MODEL)
        load_tied_serial_weights(model, saved, path)

    split_by = ("tp",)          # the axes whose ranks hold different optimizer states

    def _optimizer_file(self) -> str:
        return "optimizer." + ".".join(f"{a}{self.mesh.rank(a)}" for a in self.split_by) + ".pt"

    def save_optimizer(self, optimizer, folder, rank: int) -> None:
        if all(self.mesh.rank(a) == 0 for a in ("dp", "pp", "sp", "tp") if a not in self.split_by):
            save_file(optimizer.state_dict(), Path(folder) / self._optimizer_file())

    def load_optimizer(self, optimizer, folder) -> None:
        path = Path(folder) / self._optimizer_file()
        if not path.is_file():
            keys = " and ".join(f"parallel.{a}" for a in self.split_by)
            raise LoomError(f"{path} is missing: optimizer states are saved per rank of {keys}, so a run resumes "
                            f"with the same {keys}; to change them, start a fresh run from its weights with "
                            f"train.init_weights={folder}")
        optimizer.load_state_dict(load_file(path))


def _counted_allreduce(axis, bucket):  # no annotations: DDP checks them against its own types
    buffer = bucket.buffer()
    axis.stats.record(axis.name, "all_reduce", buffer.numel() * buffer.element_size())
    return default_hooks.allreduce_hook(axis.group, bucket)


class DDPPlugin(Plugin):
    name = "ddp"
    supported_precisions = ("fp32", "bf16", "fp16")
    supported_devices = ("cpu", "cuda")

    def configure(self, model: nn.Module, optimizer: torch.optim.Optimizer | None
                  ) -> tuple[ModelWrapper, OptimizerWrapper | None]:
        model.to(self.mesh.device)
        inner: nn.Module = model
        # every rank of dp x sp holds the same weights; under sequence parallelism each computed
        # its gradient from its part of the sequences, so they are averaged over both axes
        replicas = self.mesh.joint(("dp", "sp"))
        if replicas.size > 1:
            device_ids = [self.mesh.device.index] if self.mesh.device.type == "cuda" else None
            inner = DistributedDataParallel(model, device_ids=device_ids, process_group=replicas.group)
            inner.register_comm_hook(replicas, _counted_allreduce)
        wrapped = ModelWrapper(model, inner, self.precision)
        opt = None
        if optimizer is not None:
            attach_split_norms(optimizer, self.mesh.axis("tp"))      # LAMB / LARS: whole-parameter norms
            opt = OptimizerWrapper(optimizer, model, self.precision.make_scaler(), tp_axis=self.mesh.axis("tp"))
        return wrapped, opt

    def checkpoint_io(self) -> CheckpointIO:
        return TensorParallelCheckpointIO(self.mesh) if self.mesh.size("tp") > 1 else CheckpointIO()

    def no_sync(self, model: ModelWrapper) -> ContextManager:
        if isinstance(model.module, DistributedDataParallel):
            return model.module.no_sync()
        return super().no_sync(model)
