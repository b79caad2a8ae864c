"""ZeRO: optimizer states (stage 1), gradients (stage 2) and parameters (stage 3) sharded over
the data-parallel ranks, on the chunks of `core.memory`."""

from core.zero.gradients import GradientShards
from core.zero.optimizer import ChunkOptimizer
from core.zero.states import ChunkStates

__all__ = ["ChunkOptimizer", "ChunkStates", "GradientShards"]
