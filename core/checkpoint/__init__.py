"""Checkpoints: atomic folders, discovery of the latest one, RNG capture, replicated state IO."""

from core.checkpoint.atomic import write_atomically
from core.checkpoint.files import (CheckpointIO, check_intact, find_checkpoints, latest_checkpoint,
                                   latest_intact_checkpoint, load_file, prune_checkpoints, read_weights,
                                   save_file, step_folder)
from core.checkpoint.rng import capture_rng, restore_rng

__all__ = ["CheckpointIO", "capture_rng", "check_intact", "find_checkpoints", "latest_checkpoint",
           "latest_intact_checkpoint", "load_file", "prune_checkpoints", "read_weights", "restore_rng", "save_file", "step_folder", "write_atomically"]
