"""Checkpoint folders on disk: naming, discovery, pruning, and reading and writing their files.

    <output.dir>/checkpoints/step_0000300/
        model.safetensors   weights (loadable with safetensors alone; see `core.checkpoint.io`)
        optimizer.pt        optimizer state (or one file per rank of a split: `core.checkpoint.io`)
      or, with train.checkpoint_format=sharded (`core.checkpoint.sharded`):
        sharded.json        every tensor's global shape and where its pieces are
        shards/rank_N.safetensors   the weights and optimizer states rank N owned
        state.pt            step, scheduler, scaler, app state
        rng/rank_00000.pt   each rank's random-number generator states
        config.yaml         the complete recipe of the run
        meta.json           step, layout and time; marks the folder as a Loom checkpoint
        manifest.json       every file's size and SHA-256 (see `core.checkpoint.manifest`)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file

from core.checkpoint.manifest import verify
from core.errors import LoomError

_STEP = re.compile(r"^step_(\d+)$")


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def find_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` (those with meta.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and p.is_dir() and (p / "meta.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = find_checkpoints(root)
    return found[-1][1] if found else None


def latest_intact_checkpoint(root: Path, report=None) -> Path | None:
    """The newest checkpoint under `root` whose files match their manifest; each damaged one
    passed over is told to `report(message)`."""
    for _, path in reversed(find_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        if report is not None:
            report(f"checkpoint {path} is damaged: {problem}; passing over it")
    return None


def check_intact(folder: Path) -> None:
    """Refuse a checkpoint folder whose files do not match the manifest written at save time."""
    problem = verify(folder)
    if problem is not None:
        raise LoomError(f"checkpoint {folder} is damaged: {problem}; use an earlier checkpoint "
                        f"(train.resume=latest picks the newest intact one)")


def _damaged(path: Path, e: Exception) -> LoomError:
    return LoomError(f"{path} is damaged or not a safetensors file ({str(e).splitlines()[0]}); "
                     f"use an earlier checkpoint (train.resume=latest picks the newest intact one)")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors weights file as a dict of tensors; a damaged file is named as damaged."""
    path = Path(path)
    if not path.is_file():
        raise LoomError(f"{path} is missing; is {path.parent} a complete Loom checkpoint?")
    try:
        return st_load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise _damaged(path, e) from None


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns what was deleted."""
    found = find_checkpoints(root)
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def save_file(obj: Any, path: Path) -> None:
    # Through a Python file object: written by a path, a full disk reaches us only as torch's
    # "unexpected pos" RuntimeError; this way that error carries the OSError (ENOSPC) as its context.
    with open(path, "wb") as f:
        torch.save(obj, f)


def load_file(path: Path) -> Any:
    """Load a checkpoint file (tensors and plain Python values only, never code)."""
    path = Path(path)
    if not path.is_file():
        raise LoomError(f"checkpoint file {path} is missing; is {path.parent} a complete Loom checkpoint?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise LoomError(f"checkpoint file {path} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); it is damaged or not a Loom file") from None


def read_meta(folder: Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise LoomError(f"{folder} is not a complete Loom checkpoint (no meta.json)")
    return json.loads(path.read_text())
