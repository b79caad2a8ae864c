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
from core.layout import check_combination, chunked


def make_plugin(cfg: Recipe, mesh: ParallelMesh, materialize=None) -> Plugin:
    """The plugin for the recipe's `parallel` (and `memory`) sections, or one clear error if
    this version of Loom cannot run that combination yet."""
    check_combination(cfg, mesh.layout)
    p = cfg.parallel
    memory = None
    if chunked(cfg):
        nvme = cfg.memory.nvme_dir or str(Path(cfg.output.dir) / "nvme")
        memory = ZeroPlugin(mesh, precision=p.precision, stage=p.zero or 3, offload=p.offload, memory=cfg.memory,
                            nvme_dir=nvme, materialize=materialize)
    if mesh.size("pp") > 1:       # the stages' weights in the memory plugin's chunks, when there is one
        return PipelinePlugin(mesh, precision=p.precision, schedule=p.pp_schedule, microbatches=p.microbatches,
                              virtual_stages=p.virtual_stages, partition_by=p.pp_partition, memory=memory)
    return memory or DDPPlugin(mesh, precision=p.precision)


__all__ = ["Boosted", "Booster", "DDPPlugin", "PipelinePlugin", "ModelWrapper", "OptimizerWrapper", "Plugin",
           "ZeroPlugin", "make_plugin"]
