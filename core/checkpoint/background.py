"""A checkpoint written while training goes on (`train.checkpoint_async=true`).

The step that saves captures everything on every rank at once (its pieces copied to host memory,
the shared state and the index built, which takes the collectives), then each rank's thread
writes its own files into the temporary folder and leaves a marker there: `.done.N`, or
`.failed.N` with the error. Rank 0's thread waits for every rank's marker (the ranks share the
checkpoint folder, as every Loom checkpoint assumes), then checksums the files, writes the
manifest, flushes and renames the folder into place exactly as a synchronous save does
(`core.checkpoint.atomic`), and only then lets the older checkpoints be pruned: until the new one
is published, the previous one stays complete. A crash at any moment of this leaves at worst a
`.step_N.partial` folder, which resume never reads.

No collective runs on the threads: the ranks learn how the save ended at the next checkpoint or
at the end of the run (`finish`, on the training thread, where every rank calls it). The threads
are daemons: a run that dies (or is stopped) before `finish` leaves the save unpublished.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from core.checkpoint.atomic import _agree, _describe, _first_message, _fsync_dir, _fsync_tree
from core.checkpoint.manifest import hash_files, write_manifest
from core.distributed.comm import AxisGroup
from core.errors import LoomError
from core.faults import fault_point

WAIT_S = 3600.0          # how long rank 0 waits for the others' files before giving up the save


class BackgroundSave:
    """Started on every rank by `Booster.save(background=True)`; `finish` on every rank ends it."""

    def __init__(self, final: Path, write: Callable[[Path], None], world: AxisGroup,
                 after: Callable[[], None] | None = None) -> None:
        self.final, self.world, self.after = Path(final), world, after
        self.tmp = self.final.parent / f".{self.final.name}.partial"
        self.error: str | None = None
        problem = None
        if world.rank == 0:
            try:
                self.final.parent.mkdir(parents=True, exist_ok=True)
                if self.tmp.exists():
                    shutil.rmtree(self.tmp)
                self.tmp.mkdir()
            except OSError as e:
                problem = _describe(e, self.final)
        if not _agree(problem is None, world):      # the folder exists before any rank writes
            raise LoomError(_first_message(problem, world))
        self._thread = threading.Thread(target=self._run, args=(write,), name="loom-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[Path], None]) -> None:
        rank = self.world.rank
        try:
            write(self.tmp)
            fault_point("checkpoint.async_written")
            (self.tmp / f".done.{rank}").touch()
        except Exception as e:  # noqa: BLE001 - told to rank 0 through the folder, to all at finish
            self.error = _describe(e, self.final)
            try:
                (self.tmp / f".failed.{rank}").write_text(self.error)
            except OSError:
                pass
            if rank != 0:
                return
        if rank == 0:
            self._publish()

    def _publish(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.error is None:
            failed = sorted(self.tmp.glob(".failed.*"))
            if failed:
                self.error = f"rank {failed[0].name.rsplit('.', 1)[1]}: {failed[0].read_text()}"
                break
            if len(list(self.tmp.glob(".done.*"))) == self.world.size:
                break
            if time.monotonic() > deadline:
                self.error = f"the other ranks did not write their part of {self.final} within {WAIT_S:.0f} s"
                break
            time.sleep(0.01)
        if self.error is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            for marker in self.tmp.glob(".done.*"):
                marker.unlink()
            write_manifest(self.tmp, hash_files(self.tmp))
            _fsync_tree(self.tmp)
            old = self.final.parent / f".{self.final.name}.old"
            if self.final.exists():
                os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            _fsync_dir(self.final.parent)
            fault_point("checkpoint.published")
            shutil.rmtree(old, ignore_errors=True)
            if self.after is not None:
                self.after()          # (pruning: only once the new checkpoint is in place)
        except OSError as e:
            self.error = _describe(e, self.final)
            shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def finish(self) -> Path:
        """Wait for this rank's part (and on rank 0 the publication); every rank calls it. Raises
        the first failing rank's message on every rank if the checkpoint was not published."""
        self._thread.join()
        if not _agree(self.error is None, self.world):
            raise LoomError(_first_message(self.error, self.world))
        return self.final
