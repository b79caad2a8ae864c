"""A file for the updates the strip triangle multiplication holds back (`apps.protein.evoformer`).

Made a strip of rows at a time, the triangle multiplication cannot write the update of a later
row at an earlier strip's columns until that row's own strip has been projected: the waiting
updates grow to a quarter of the pair representation. Past the longest sequence whose Evoformer
fits in memory with them, they can wait on a local disk instead: each tile is written once when
it is made and read once when its rows' strip is done (a quarter of z written and read per
triangle multiplication at the peak of the wait, half of z in all), so memory holds one tile.
The file goes through `core.memory.store.NVMeStore` (pre-allocated, direct IO, aligned buffers:
the page cache does not take back the memory the file saves) in a folder of its own that is
removed afterwards.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from core.errors import LoomError
from core.memory.store import NVMeStore, filesystem_type

MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


class HeldUpdates:
    """The waiting tiles kept in memory (what fits), with `WaitingUpdates`'s interface."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[int, int], torch.Tensor] = {}

    def put(self, rows: int, cols: int, update: torch.Tensor) -> None:
        self._waiting[rows, cols] = update

    def take(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for cols in sorted(c for r, c in self._waiting if r == rows):
            yield cols, self._waiting.pop((rows, cols))


class WaitingUpdates:
    """The waiting tiles of one stack call: tile (r, c) is the update of strip r's rows at strip
    c's columns (r > c), put when strip c is done and taken when strip r is."""

    def __init__(self, folder: str | Path, strips: int, side: int, c_z: int, dtype: torch.dtype) -> None:
        folder = Path(folder).expanduser()
        kind = filesystem_type(folder)
        if kind in MEMORY_FILESYSTEMS:
            raise LoomError(f"memory.spill_dir {folder} is on {kind}, which keeps files in memory: spilling there "
                            f"saves nothing; point it at a folder on a local disk")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._dir = tempfile.TemporaryDirectory(dir=folder, prefix="loom-evoformer-")
        except OSError as e:
            raise LoomError(f"memory.spill_dir: cannot make a folder in {folder}: {e.strerror}") from None
        self.strips = strips
        tile = side * side * c_z * torch.empty((), dtype=dtype).element_size()
        try:
            self.store = NVMeStore(self._dir.name, {"update": (strips * strips, tile)}, threads=1,
                                   setting="memory.spill_dir")
        except BaseException:
            self._dir.cleanup()
            raise
        self._waiting: dict[tuple[int, int], tuple[torch.Size, torch.dtype, torch.device]] = {}

    def put(self, rows: int, cols: int, update: torch.Tensor) -> None:
        self.store.write("update", rows * self.strips + cols, update)
        self._waiting[rows, cols] = (update.shape, update.dtype, update.device)

    def take(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Strip `rows`'s waiting tiles as (column strip, tile), read back one at a time."""
        for cols in sorted(c for r, c in self._waiting if r == rows):
            shape, dtype, device = self._waiting.pop((rows, cols))
            tile = torch.empty(shape, dtype=dtype, device=device)
            self.store.read("update", rows * self.strips + cols, tile)
            yield cols, tile

    @property
    def bytes_written(self) -> int:
        return self.store.bytes_written

    def close(self) -> None:
        self.store.close()
        self._dir.cleanup()
