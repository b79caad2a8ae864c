"""Data parallelism with torch's DistributedDataParallel (and the single-process case), and
under it tensor parallelism (any `core.tensor` mode) for models built on its layers.

With dp = 1 the model runs as it is. With dp > 1 it is wrapped in DDP over the mesh's `dp`
axis; DDP's gradient all-reduces go through a communication hook that counts them in the
mesh's `CommStats`, so the accounting covers what DDP sends too.
"""

from __future__ import annotations

from typing import ContextManager

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from core.booster.plugin import ModelWrapper, OptimizerWrapper, Plugin
from core.checkpoint import CheckpointIO, Sharding
from core.optim.split_norms import attach as attach_split_norms


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
        return CheckpointIO(Sharding(self.mesh))       # every rank holds the model (its tp parts)

    def no_sync(self, model: ModelWrapper) -> ContextManager:
        if isinstance(model.module, DistributedDataParallel):
            return model.module.no_sync()
        return super().no_sync(model)
