"""The contract every Booster plugin fulfils.

A plugin says what it supports (precisions, devices, `no_sync`, checkpoint IO) and configures
the objects it is given: it wraps the model for its parallel scheme, wraps the optimizer so
that backward, clipping and stepping do the right thing for that scheme, and builds the
data loader that gives each rank its share of every global batch. The Booster, the trainer
and the apps talk only to this interface.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from core.amp import Precision
from core.memory.recompute import Recompute
from core.checkpoint import CheckpointIO
from core.checkpoint.sharding import unsplit
from core.distributed.comm import all_reduce_
from core.data import GlobalBatchSampler
from core.distributed import ParallelMesh
from core.errors import LoomError


class ModelWrapper(nn.Module):
    """The model as the plugin runs it. `forward` runs under the plugin's autocast."""

    def __init__(self, module: nn.Module, inner: nn.Module, precision: Precision) -> None:
        super().__init__()
        self.module = inner          # what runs (the model itself, or DDP around it)
        self._unwrapped = [module]   # the user's model, out of the module tree
        self.precision = precision

    def unwrap(self) -> nn.Module:
        return self._unwrapped[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision.autocast():
            return self.module(*args, **kwargs)


class OptimizerWrapper:
    """The optimizer as the plugin steps it: loss scaling, clipping and stepping in one place.

    Under fp16 the ranks that hold different gradients (tensor-parallel parts, pipeline stages:
    `agree`) decide together: one rank's overflow skips the step, and lowers the scale, on all of
    them, so their weights and scales never drift apart."""

    def __init__(self, optim: torch.optim.Optimizer, model: nn.Module,
                 scaler: "torch.amp.GradScaler | None" = None, tp_axis=None, agree: tuple = ()) -> None:
        self.optim = optim
        self.model = model
        self.scaler = scaler
        self.tp_axis = tp_axis
        self.agree = tuple(a for a in (tp_axis, *agree) if a is not None and a.size > 1)
        self.skipped_steps = 0
        self._unscaled = False

    @property
    def param_groups(self) -> list[dict]:
        return self.optim.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _unscale(self) -> None:
        if self.scaler is not None and not self._unscaled:
            self.scaler.unscale_(self.optim)
            self._unscaled = True
            self._agree_on_overflow()

    def _agree_on_overflow(self) -> None:
        """Make this rank's overflow verdict the verdict of every rank in `agree` (torch's scaler
        keeps it per optimizer and device; `step` and `update` both read it there)."""
        if not self.agree:
            return
        found = self.scaler._per_optimizer_states[id(self.optim)]["found_inf_per_device"]
        flag = torch.tensor([float(any(bool(v.item()) for v in found.values()))],
                            device=next(iter(found.values())).device if found else "cpu")
        for axis in self.agree:
            all_reduce_(flag, axis, "max")
        for v in found.values():
            v.fill_(flag.item())

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to `max_norm`; returns the norm before clipping (float32)."""
        from core.optim.norms import clip_, clip_coef

        self._unscale()
        params = [p for g in self.optim.param_groups for p in g["params"]]
        norm = self._grad_norm(params)
        clip_(params, clip_coef(norm, max_norm))
        return norm.float()

    def _grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The norm of the whole model's gradient (`core.optim.norms`); under tensor parallelism
        the unsplit model's, each value counted once and the parts summed over the tp axis."""
        from core.optim.norms import global_norm, gradients

        return global_norm(gradients(params, self.tp_axis), (self.tp_axis,))

    def step(self) -> bool:
        """One optimizer step; False when fp16 gradients overflowed and the step was skipped."""
        if self.scaler is None:
            self.optim.step()
            return True
        self._unscale()
        self._unscaled = False
        scale = self.scaler.get_scale()
        self.scaler.step(self.optim)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= scale
        self.skipped_steps += not stepped
        return stepped

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state)


class Plugin(ABC):
    """What a parallel scheme supports, and how it configures a model for it."""

    # The contract: what a scheme supports, read by the Booster, the session and the trainer.
    name: str = "plugin"
    supported_precisions: tuple[str, ...] = ("fp32",)
    supported_devices: tuple[str, ...] = ("cpu", "cuda")
    pipelined: bool = False        # steps run through execute_pipeline: the model is cut into stages
    chunked: bool = False          # parameters live in memory chunks: not readable between steps

    def __init__(self, mesh: ParallelMesh, precision: str = "fp32") -> None:
        self.mesh = mesh
        if precision not in self.supported_precisions:
            raise LoomError(f"parallel.precision={precision} is not supported by the {self.name} plugin; "
                            f"allowed: {', '.join(self.supported_precisions)}")
        if mesh.device.type not in self.supported_devices:
            raise LoomError(f"the {self.name} plugin does not run on {mesh.device.type}; "
                            f"allowed: {', '.join(self.supported_devices)}")
        self.precision = Precision(precision, mesh.device)
        # what the model calls for activation checkpointing: it must know where the weights live
        self.recompute = Recompute()

    @abstractmethod
    def configure(self, model: nn.Module, optimizer: torch.optim.Optimizer | None
                  ) -> tuple[ModelWrapper, OptimizerWrapper | None]:
        """Wrap the model and the optimizer for this scheme."""

    def no_sync(self, model: ModelWrapper) -> ContextManager:
        """Skip gradient synchronisation inside the block (accumulation micro-batches)."""
        return contextlib.nullcontext()

    def checkpoint_io(self) -> CheckpointIO:
        return CheckpointIO()

    @property
    def dp(self):
        """The axis over which samples are split."""
        return self.mesh.axis("dp")

    def prepare_dataloader(self, dataset: Dataset, micro_batch: int, grad_accum: int, *,
                           seed: int, shuffle: bool = True, start_step: int = 0,
                           steps: int | None = None, collate_fn: Callable | None = None,
                           num_workers: int = 0) -> DataLoader:
        """This rank's share of every global batch, in an order fixed by (seed, step)."""
        sampler = GlobalBatchSampler(len(dataset), micro_batch, grad_accum, self.dp.rank, self.dp.size,
                                     seed=seed, shuffle=shuffle, start_step=start_step, steps=steps,
                                     with_epoch=getattr(dataset, "wants_epoch", False))
        # A private generator: creating the loader's iterator must not draw from the global RNG
        # (that would make a resumed run differ from an unbroken one).
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                          num_workers=num_workers, pin_memory=self.mesh.device.type == "cuda",
                          generator=torch.Generator().manual_seed(seed),
                          persistent_workers=num_workers > 0)

    def describe(self) -> str:
        return f"{self.name} ({self.mesh.layout.describe()}, {self.precision.name}, {self.mesh.device})"

    def builds_on_meta(self) -> bool:
        """The model may be made on the meta device and materialised where it will live (through
        `materialize`), so that it never exists whole in host memory."""
        return False

    def forward_on_one_rank(self) -> bool:
        """One rank may run the model on its own (validation on rank 0, say) between steps."""
        return True

    def average(self, module: nn.Module, decay: float):
        """An exponential moving average of `module`'s trained weights for this scheme
        (`core.ema.EMA`: a copy beside the model, read after each step)."""
        from core.ema import EMA

        return EMA(module, decay)

    def unchunk(self, model: nn.Module) -> nn.Module:
        """The model with ordinary parameters after training (a no-op unless the plugin moved
        them into chunks). Every rank calls it."""
        return model

    def weights(self, module: nn.Module, trained_only: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """`module`'s state dict (its parameters at their unsplit shapes, by their first name, and
        its persistent buffers), a part at a time, as the plugin can best gather it: here in one
        part, as the checkpoints gather it. `trained_only`: the parameters that require grad, and
        no buffers. A collective: every rank iterates to the end; which ranks get the values is
        the checkpoints' rule (all of them, but rank 0 under pipeline parallelism)."""
        if trained_only:
            yield unsplit(module, {n: p.detach() for n, p in module.named_parameters() if p.requires_grad})
        else:
            yield self.checkpoint_io().sharding.gather(module)

    def between_steps(self, passes: nn.Module | None = None) -> ContextManager:
        """The context of work on the model between training steps (validation, sampling);
        `passes`: a module it runs repeatedly (see `Session.between_steps`)."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Release what the plugin holds beyond the model (files, threads); the session calls it
        when it ends. Idempotent."""

    def report(self) -> str | None:
        """A line for the end of a run (what the plugin moved, for one), or None."""
        return None
