"""The Booster and its plugins; `make_plugin` picks the plugin a recipe asks for."""

from __future__ import annotations

from core.booster.booster import Boosted, Booster
from core.booster.ddp import DDPPlugin
from core.booster.plugin import ModelWrapper, OptimizerWrapper, Plugin
from core.config import ParallelConfig
from core.distributed import ParallelMesh
from core.errors import LoomError


def make_plugin(cfg: ParallelConfig, mesh: ParallelMesh) -> Plugin:
    """The plugin for the recipe's `parallel` section, or one clear error if this version of
    Loom cannot run that combination yet."""
    missing = []
    if cfg.zero:
        missing.append(f"parallel.zero={cfg.zero} (ZeRO)")
    if cfg.offload != "none":
        missing.append(f"parallel.offload={cfg.offload} (heterogeneous memory)")
    for axis, what in (("tp", "tensor"), ("pp", "pipeline"), ("sp", "sequence")):
        if mesh.size(axis) > 1:
            missing.append(f"parallel.{axis}={mesh.size(axis)} ({what} parallelism)")
    if missing:
        raise LoomError(f"{', '.join(missing)} is not available in this version of Loom; "
                        f"what runs today is data parallelism (parallel.dp) with "
                        f"parallel.precision=fp32|bf16|fp16")
    return DDPPlugin(mesh, precision=cfg.precision)


__all__ = ["Boosted", "Booster", "DDPPlugin", "ModelWrapper", "OptimizerWrapper", "Plugin", "make_plugin"]
