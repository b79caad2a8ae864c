"""What a run's output folder and starting points must be, checked before any work starts.

`check_run_folder` reads only names and small files: it is what every app calls before it builds
or loads anything, and what the trainer's own start relies on, so the refusals read the same in
every app. (Whether a checkpoint's bytes are intact is checked later, by the trainer, against its
manifest: that reads every byte once.)
"""

from __future__ import annotations

import os
from pathlib import Path

from core.checkpoint import find_checkpoints, latest_checkpoint
from core.config import OutputConfig, TrainConfig
from core.errors import LoomError, named

EXAMPLE = "runs/NAME/checkpoints/step_0000100"


def check_writable(path: str | Path, what: str) -> None:
    """`path` is a folder this process may write in, or one it can create."""
    target = Path(path).expanduser()
    subject = named(what, path)
    if target.exists() and not target.is_dir():
        raise LoomError(f"{subject} is a file, not a folder; give a folder (it is made if missing)")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise LoomError(f"{subject} cannot be made, because {probe} is a file; choose another folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LoomError(f"{subject} is not writable (no write permission on {probe}); choose another folder")


def refuse_earlier_run(out: str | Path, overwrite: bool, found: str | None, what: str = "checkpoints",
                       resumable: bool = True) -> None:
    """The one refusal, in every app, of an output.dir that holds an earlier run's results
    (`found` says which; None when there are none)."""
    if found is not None and not overwrite:
        resume = "continue it with train.resume=latest, " if resumable else ""
        raise LoomError(f"output.dir {out} already holds {what} ({found}) from an earlier run; {resume}"
                        f"start over with output.overwrite=true, or choose another output.dir")


def resume_folder(resume: str, root: Path) -> Path:
    """The checkpoint folder that train.resume=PATH names (an output folder: its newest checkpoint)."""
    path = Path(resume).expanduser()
    if (path / "checkpoints").is_dir():
        path = latest_checkpoint(path / "checkpoints") or path
    if not (path / "meta.json").is_file():
        why = "it does not exist" if not path.exists() else "no meta.json"
        raise LoomError(f"train.resume: {resume} is not a Loom checkpoint folder ({why}); pass 'latest' or "
                        f"a folder such as {root}/step_0000100")
    return path


def init_folder(init_weights: str) -> Path:
    path = Path(init_weights).expanduser()
    if not path.is_dir():
        problem = "does not exist" if not path.exists() else "is not a folder"
        raise LoomError(f"train.init_weights: {init_weights} {problem}; give a checkpoint folder such as {EXAMPLE}")
    if not (path / "meta.json").is_file():
        raise LoomError(f"train.init_weights: {init_weights} is not a complete Loom checkpoint folder "
                        f"(no meta.json); give one such as {EXAMPLE}")
    return path


def check_run_folder(output: OutputConfig, train: TrainConfig) -> None:
    """output.dir can hold this run; train.resume and train.init_weights name checkpoints."""
    check_writable(output.dir, "output.dir")
    root = Path(output.dir).expanduser() / "checkpoints"
    if train.resume == "":
        existing = find_checkpoints(root)
        refuse_earlier_run(output.dir, output.overwrite, f"up to step {existing[-1][0]}" if existing else None)
    elif train.resume != "latest":
        resume_folder(train.resume, root)
    if train.init_weights:
        init_folder(train.init_weights)
