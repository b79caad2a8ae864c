"""The Booster and its plugins; `make_plugin` picks the plugin a recipe asks for."""

from __future__ import annotations

from pathlib import Path

from core.booster.booster import Boosted, Booster
from core.booster.ddp import DDPPlugin
from core.booster.pipeline import PipelinePlugin
from core.booster.zero import ZeroPlugin
from core.booster.plugin import ModelWrapper, OptimizerWrapper, Plugin
from core.config import Recipe
from core.distributed import ParallelMesh
from core.errors import LoomError


def make_plugin(cfg: Recipe, mesh: ParallelMesh, materialize=None) -> Plugin:
    """The plugin for the recipe's `parallel` (and `memory`) sections, or one clear error if
    this version of Loom cannot run that combination yet."""
    p = cfg.parallel
    missing = []
    if mesh.size("sp") > 1 and mesh.size("pp") > 1:
        missing.append("sequence parallelism (parallel.sp) together with pipeline parallelism (parallel.pp)")
    for axis, what in (("pp", "parallel.pp"), ("sp", "parallel.sp")):
        if mesh.size(axis) > 1 and (p.zero or p.offload != "none" or cfg.memory.device_gb > 0):
            missing.append(f"ZeRO or offload together with {what}")
    if mesh.size("tp") > 1 and (p.zero == 3 or p.offload != "none" or cfg.memory.device_gb > 0):
        missing.append("ZeRO-3, offload or a device budget together with parallel.tp (ZeRO-1 and 2 run with it)")
    if missing:
        raise LoomError(f"{', '.join(missing)} is not available in this version of Loom; what runs today is "
                        f"data parallelism (parallel.dp) with pipeline (parallel.pp) and tensor parallelism (parallel.tp, "
                        f"parallel.tp_mode=1d|2d|2.5d|3d), data with sequence (parallel.sp) and tensor parallelism, "
                        f"tensor parallelism with ZeRO-1/2 (parallel.zero=1|2), or data parallelism with ZeRO "
                        f"(parallel.zero=1|2|3) and offload (parallel.offload=cpu|nvme)")
    if cfg.memory.step_in_backward:
        from core.trainer import plan_batches   # core.trainer imports this module

        accum = plan_batches(cfg.train, mesh.size("dp")).grad_accum
        clash = [what for bad, what in ((cfg.train.grad_clip > 0, f"train.grad_clip={cfg.train.grad_clip:g}"),
                                        (accum > 1, f"train.grad_accum={accum}"),
                                        (p.precision == "fp16", "parallel.precision=fp16")) if bad]
        if clash:
            raise LoomError(f"memory.step_in_backward=true updates each chunk during backward, which rules out "
                            f"{', '.join(clash)}; set train.grad_clip=0, train.grad_accum=1 and bf16 or fp32")
        if not (p.zero or p.offload != "none" or cfg.memory.device_gb > 0):
            raise LoomError("memory.step_in_backward=true needs the chunked engine: set parallel.zero or "
                            "parallel.offload")
    if mesh.size("pp") > 1:
        return PipelinePlugin(mesh, precision=p.precision, schedule=p.pp_schedule, microbatches=p.microbatches,
                            virtual_stages=p.virtual_stages, partition_by=p.pp_partition)
    if p.offload != "none" or cfg.memory.device_gb > 0:
        nvme = cfg.memory.nvme_dir or str(Path(cfg.output.dir) / "nvme")
        return ZeroPlugin(mesh, precision=p.precision, stage=p.zero or 3, offload=p.offload, memory=cfg.memory,
                            nvme_dir=nvme, materialize=materialize)
    if p.zero:
        return ZeroPlugin(mesh, precision=p.precision, stage=p.zero, memory=cfg.memory, materialize=materialize)
    return DDPPlugin(mesh, precision=p.precision)


__all__ = ["Boosted", "Booster", "DDPPlugin", "PipelinePlugin", "ModelWrapper", "OptimizerWrapper", "Plugin",
           "ZeroPlugin", "make_plugin"]
