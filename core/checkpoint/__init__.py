"""Checkpoints: atomic folders, discovery of the latest one, RNG capture, replicated state IO."""

from core.checkpoint.atomic import write_atomically
from core.checkpoint.files import (CheckpointIO, find_checkpoints, latest_checkpoint, load_file,
                                   prune_checkpoints, save_file, step_folder)
from core.checkpoint.rng import capture_rng, restore_rng

__all__ = ["CheckpointIO", "capture_rng", "find_checkpoints", "latest_checkpoint", "load_file",
           "prune_checkpoints", "restore_rng", "save_file", "step_folder", "write_atomically"]
