"""Checkpoints: atomic folders, discovery of the latest one, RNG capture, and the one format of
model and optimizer files that every plugin writes through a `Sharding`."""

from core.checkpoint.atomic import write_atomically
from core.checkpoint.files import (check_intact, find_checkpoints, latest_checkpoint, latest_intact_checkpoint,
                                   load_file, prune_checkpoints, read_weights, save_file, step_folder)
from core.checkpoint.io import CheckpointIO
from core.checkpoint.rng import capture_rng, restore_rng
from core.checkpoint.sharding import Sharding

__all__ = ["CheckpointIO", "Sharding", "capture_rng", "check_intact", "find_checkpoints", "latest_checkpoint",
           "latest_intact_checkpoint", "load_file", "prune_checkpoints", "read_weights", "restore_rng", "save_file",
           "step_folder", "write_atomically"]
