"""Pipeline parallelism: schedules (GPipe, 1F1B, interleaved 1F1B), stage partitioning and the
runner that executes a schedule with point-to-point messages between stages. The `pipeline`
Booster plugin (`core.booster.pipeline`) composes it with data and tensor parallelism."""

from core.pipeline.engine import PipelineLayer, StageRunner, StepRecord, partition, prune
from core.pipeline.schedule import SCHEDULES, Action, build, check, simulate

__all__ = ["SCHEDULES", "Action", "PipelineLayer", "StageRunner", "StepRecord", "build", "check", "partition",
           "prune", "simulate"]
