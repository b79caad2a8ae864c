"""What a complete checkpoint holds: every file's size and SHA-256, recorded at save time.

`manifest.json` is written after every rank has written its part and before the folder is
renamed into place, so it describes exactly the bytes that were meant to be published. Checking
a folder against it (`verify`) finds a truncated, damaged or missing file before anything is
loaded from it, so a damaged checkpoint is reported as damaged, never as one that "does not fit
this model". Folders written before manifests existed have none and are taken as they are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

NAME = "manifest.json"
_BLOCK = 8 << 20


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != NAME)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def hash_files(folder: Path, rank: int = 0, world_size: int = 1) -> dict[str, dict]:
    """Size and SHA-256 of this rank's share of the files in `folder` (every world_size-th one)."""
    folder = Path(folder)
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
            for name in _files(folder)[rank::world_size]}


def write_manifest(folder: Path, digests: dict[str, dict]) -> None:
    missing = sorted(set(_files(folder)) - set(digests))
    if missing:
        raise OSError(f"files appeared in {folder} while it was being hashed: {missing[:3]}")
    (Path(folder) / NAME).write_text(json.dumps({"version": 1, "files": digests}, indent=1, sort_keys=True) + "\n")


def verify(folder: Path) -> str | None:
    """None when every file the manifest lists is present with its size and checksum; else what
    is wrong, in words. A folder without a manifest (an older Loom) is not checked."""
    folder = Path(folder)
    path = folder / NAME
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {NAME} cannot be read ({type(e).__name__})"
    for name, want in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes where {want['bytes']:,} were written (truncated or damaged)"
    for name, want in sorted(files.items()):
        if sha256(folder / name) != want["sha256"]:
            return f"{name} does not match the checksum written at save time (damaged)"
    return None
