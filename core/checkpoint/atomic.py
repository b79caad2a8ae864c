"""Write a checkpoint folder so that it either exists complete or not at all.

Every rank writes its part into a temporary folder beside the final one; the ranks agree that
all parts were written; the ranks share the hashing of the files and rank 0 records every file's
size and SHA-256 in `manifest.json` (`core.checkpoint.manifest`), flushes the files to disk and
renames the folder into place (a rename is atomic on POSIX file systems). A rank that fails (a full disk, a permission
error) makes every rank fail with one clear message, the temporary folder is removed, and
the checkpoints written before stay as they were.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from core.checkpoint.manifest import hash_files, write_manifest
from core.distributed import comm
from core.distributed.comm import AxisGroup
from core.errors import LoomError
from core.faults import fault_point


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(e: BaseException | None) -> bool:
    """A full disk, in the error or in what caused it (torch's writer wraps the OSError)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # Writers implemented in other languages (safetensors) report it only in their message.
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _describe(e: BaseException, final: Path) -> str:
    if _disk_full(e):
        free = shutil.disk_usage(final.parent).free
        return (f"the disk is full while writing checkpoint {final} ({free / 2**20:.0f} MiB free); "
                f"free some space or point output.dir elsewhere, then continue with train.resume=latest")
    if isinstance(e, OSError):
        return f"cannot write checkpoint {final}: {e.strerror or e} ({getattr(e, 'filename', '') or ''})"
    return f"writing checkpoint {final} failed: {type(e).__name__}: {e}"


def write_atomically(final: Path, write: Callable[[Path], None], world: AxisGroup) -> Path:
    """Call `write(tmp_folder)` on every rank, then publish the folder as `final`.

    Raises LoomError on every rank if any rank's `write` failed; nothing is left at `final`
    and no temporary folder remains.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.partial"
    error: BaseException | None = None
    if world.rank == 0:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            error = e
    ready = _agree(error is None, world)  # the folder exists before anyone writes into it
    if ready:
        fault_point("checkpoint.begin")
        try:
            write(tmp)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = e
        fault_point("checkpoint.parts_written")
    all_ok = ready and _agree(error is None, world)
    if all_ok:
        try:
            mine = hash_files(tmp, world.rank, world.size)
        except OSError as e:
            error, mine = e, None
        digests = _gather(mine, world)
        if world.rank == 0 and digests is not None:
            try:
                write_manifest(tmp, digests)
            except OSError as e:
                error = e
        all_ok = _agree(error is None, world)
        fault_point("checkpoint.manifest_written")
    if all_ok and world.rank == 0:
        try:
            _fsync_tree(tmp)
            fault_point("checkpoint.synced")
            old = final.parent / f".{final.name}.old"
            if final.exists():  # the same step written again: the old copy goes only after
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            fault_point("checkpoint.published")
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            error = e
    published = _agree(error is None, world) if all_ok else False
    if published:
        return final
    if world.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    # Every rank raises the failing rank's own message (the clean-up is done by then).
    message = _first_message(_describe(error, final) if error is not None else None, world)
    raise LoomError(message) from error


def _gather(mine: dict | None, world: AxisGroup) -> dict | None:
    """Every rank's dict merged (each rank hashed its share of the files); None if any rank failed."""
    if world.size == 1:
        return mine
    parts: list = [None] * world.size
    dist.all_gather_object(parts, mine)
    if any(part is None for part in parts):
        return None
    return {k: v for part in parts for k, v in part.items()}


def _first_message(mine: str | None, world: AxisGroup) -> str:
    if world.size == 1:
        return mine or "writing the checkpoint failed"
    messages: list = [None] * world.size
    dist.all_gather_object(messages, mine)
    for rank, m in enumerate(messages):
        if m is not None:
            return m if rank == world.rank else f"rank {rank}: {m}"
    return "writing the checkpoint failed"


def _agree(ok: bool, world: AxisGroup) -> bool:
    """True when every rank says ok (also a barrier)."""
    if world.size == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=world.device)
    return bool(comm.all_reduce(flag, world, op="min").item())
