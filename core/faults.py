"""Named points where a test may kill this process, to prove that nothing is lost when one dies.

    LOOM_KILL_AT=checkpoint.parts_written:3 python -m apps.gpt.pretrain ...

kills the process with SIGKILL the 3rd time it passes `fault_point("checkpoint.parts_written")`
(the count is per process; `:1` when omitted). With `LOOM_KILL_AT` unset a fault point costs one
dictionary look-up. `LOOM_KILL_RANK=r` limits the kill to global rank r.

The points, in the order a checkpoint passes them (`core/checkpoint/atomic.py`):
`checkpoint.begin` (the temporary folder exists), `checkpoint.parts_written` (this rank wrote its
files), `checkpoint.manifest_written` (sizes and checksums recorded), `checkpoint.synced` (flushed
to disk, not yet renamed), `checkpoint.published` (renamed into place, the previous copy of the
same step not yet removed); and `train.step` after each optimizer step.
"""

from __future__ import annotations

import os
import signal

_passed: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("LOOM_KILL_AT")
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    rank = os.environ.get("LOOM_KILL_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _passed[name] = _passed.get(name, 0) + 1
    if _passed[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
