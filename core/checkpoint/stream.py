"""A safetensors file written one part at a time, for weights that never exist whole in memory.

`safetensors.torch.save_file` takes every tensor at once. Weights kept in chunks on the host or
on NVMe are gathered a chunk at a time (`Session.weights`), so the whole fp32 model would have to
be assembled first only to be written. The format allows better: a file is an 8-byte little-endian
header length, a JSON header giving each tensor's dtype, shape and byte range in the data that
follows, then the data. Knowing every name, shape and dtype up front is enough to write the header
first; each tensor's bytes are then written at their place as its part arrives (`put`), and the file
is complete (and checked to be) when every tensor has been put. Nothing larger than the part in
hand is ever held.

    write_parts(path, state_specs(module), session.weights(module), metadata={"format": "pt"})

`state_specs` names what `Session.weights` yields for a module: its parameters by their first name
at their unsplit shapes (floating ones in fp32, as the weights are gathered), then its persistent
buffers as they are.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from core.checkpoint.reader import PIECE, SAFETENSORS_DTYPES
from core.checkpoint.sharding import split_layer
from core.checkpoint.weights import persistent_buffers
from core.errors import LoomError


class SafetensorsWriter:
    """`specs`: every tensor the file will hold, name -> (dtype, shape), in the order their bytes are
    laid out. `put` each of them once (any order); `close` checks that none is missing."""

    def __init__(self, path: str | Path, specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        self._where: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for name, (dtype, shape) in specs.items():
            if dtype not in SAFETENSORS_DTYPES:
                raise LoomError(f"{name}: dtype {dtype} has no safetensors name")
            shape = tuple(int(d) for d in shape)
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            self._where[name] = (dtype, shape, offset, end)
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)          # the data starts 8-byte aligned, as safetensors writes it
        self._start = 8 + len(text)
        self._todo = set(self._where)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self._fd, self._start + offset)
            self._write(struct.pack("<Q", len(text)) + text, 0)
        except BaseException:
            self._abandon()
            raise

    def _write(self, data, at: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:done + PIECE], at + done)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes at its place (converted to the dtype its spec names)."""
        if name not in self._where:
            raise LoomError(f"{self.path.name}: {name} is not one of the tensors this file was planned with")
        dtype, shape, start, _ = self._where[name]
        if tuple(tensor.shape) != shape:
            raise LoomError(f"{self.path.name}: {name} has shape {tuple(tensor.shape)}, planned {shape}")
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1)
        if data.numel():
            self._write(data.view(torch.uint8).numpy(), self._start + start)
        self._todo.discard(name)

    def put_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            self.put(name, tensor)

    def close(self) -> None:
        """Flush the file to disk; a missing tensor is an error (and the file is removed)."""
        if self._fd < 0:
            return
        if self._todo:
            missing = sorted(self._todo)
            self._abandon()
            raise LoomError(f"{self.path}: {len(missing)} tensors were never written ({', '.join(missing[:5])}"
                            f"{', ...' if len(missing) > 5 else ''})")
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def _abandon(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self._abandon()


def state_specs(module: nn.Module, trained_only: bool = False) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape) of what `Session.weights(module, trained_only)` yields."""
    specs = {}
    for name, p in module.named_parameters():
        if trained_only and not p.requires_grad:
            continue
        split = split_layer(module, name)
        shape = split[0].serial_shapes[split[1]] if split is not None else p.shape
        specs[name] = (torch.float32 if p.is_floating_point() else p.dtype, tuple(shape))
    if not trained_only:
        specs.update({n: (b.dtype, tuple(b.shape)) for n, b in persistent_buffers(module).items()})
    return specs


def write_parts(path: str | Path | None, specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                parts: Iterable[Mapping[str, torch.Tensor]], metadata: Mapping[str, str] | None = None) -> None:
    """Write the `parts` (dicts of tensors named in `specs`) into one safetensors file at `path`.
    `path` None: only go through the parts (a rank that takes part in gathering them but does
    not write)."""
    if path is None:
        for _ in parts:
            pass
        return
    with SafetensorsWriter(path, specs, metadata) as out:
        for part in parts:
            out.put_all(part)
