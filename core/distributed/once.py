"""Work that one rank does for all: building a cache, generating data."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from core.distributed import comm
from core.distributed.comm import AxisGroup
from core.errors import LoomError

T = TypeVar("T")


def on_main_first(world: AxisGroup, build: Callable[[], T], what: str) -> T | None:
    """Run `build` on rank 0 while the others wait. A LoomError (or OSError) there is raised on
    every rank, with rank 0's message on rank 0 and a pointer to it elsewhere."""
    error: LoomError | None = None
    result = None
    if world.rank == 0:
        try:
            result = build()
        except LoomError as e:
            error = e
        except OSError as e:
            error = LoomError(f"{what} failed: {e.strerror or e} ({getattr(e, 'filename', '') or ''})")
    flag = torch.tensor([0 if error else 1], dtype=torch.int32, device=world.device)
    ok = bool(comm.all_reduce(flag, world, op="min").item()) if world.size > 1 else error is None
    if not ok:
        raise error or LoomError(f"rank 0 failed: {what}; see its message")
    return result
