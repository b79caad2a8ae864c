"""A safetensors file read tensor by tensor with positioned reads, never memory-mapped whole.

safetensors' torch loader maps the whole file privately (a writable copy-on-write mapping), which
the kernel's overcommit check refuses once the file is larger than memory and swap: a 24 GiB
OPT-13B `model.safetensors` could not even be opened on a 24 GiB machine, so no generation could
stream it. `SafetensorsReader` opens a file by reading its header, and a tensor costs its own bytes.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from pathlib import Path

import torch

from core.errors import LoomError

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
                      torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
PIECE = 64 * 2**20          # bytes per read or write system call (a 145 MiB embedding goes in three)

_FROM_CODE = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
_LARGEST_HEADER = 100 * 2**20           # safetensors' own bound on a header


class SafetensorsReader:
    """One safetensors file. Opening reads the header only; a tensor's bytes are read when it is
    asked for, and their pages dropped from the page cache once read (a run under a memory cap does
    not fill it with weights already copied where they live). The methods are those of
    `safetensors.safe_open` that Loom uses: `keys`, `metadata`, `get_tensor`, `get_slice` (whose
    `[...]` reads the bytes of the box it selects)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, 8, 0)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than the header's length")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, _LARGEST_HEADER):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(os.pread(self._fd, length, 8))
            self._meta = header.pop("__metadata__", None)
            self._start = 8 + length
            self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if e["dtype"] not in _FROM_CODE:
                    raise ValueError(f"{name} has dtype {e['dtype']}, which Loom does not read")
                dtype, shape, (begin, end) = _FROM_CODE[e["dtype"]], tuple(int(d) for d in e["shape"]), e["data_offsets"]
                if end - begin != math.prod(shape) * dtype.itemsize or self._start + end > size:
                    raise ValueError(f"{name}: bytes {begin}-{end} do not hold {shape} {e['dtype']} in a file of {size}")
                self._entries[name] = (dtype, shape, begin, end)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            self.close()
            raise LoomError(f"{self.path} is damaged or not a safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def metadata(self) -> dict[str, str] | None:
        return self._meta

    def get_tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entry(name)
        return self._read(begin, end).view(dtype).reshape(shape)

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Read tensor `name` straight into `out` when `out` is contiguous host memory of its dtype
        and shape (no temporary copy of it); False, reading nothing, otherwise."""
        dtype, shape, begin, end = self._entry(name)
        if out.dtype != dtype or tuple(out.shape) != shape or out.device.type != "cpu" or not out.is_contiguous():
            return False
        if end > begin:
            self._read_into(_bytes_of(out), begin)
        return True

    def get_slice(self, name: str) -> "_SafetensorsSlice":
        self._entry(name)
        return _SafetensorsSlice(self, name)

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise LoomError(f"{self.path} has no tensor {name}") from None

    def _read(self, begin: int, end: int) -> torch.Tensor:
        out = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            self._read_into(_bytes_of(out), begin)
        return out

    def _read_into(self, view: memoryview, begin: int) -> None:
        """Fill `view` with the data's bytes from `begin` on."""
        at, done = self._start + begin, 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:done + PIECE]], at + done)
            if n == 0:
                raise LoomError(f"{self.path} ends before its tensors do: the file is truncated")
            done += n
        if done >= 2**20 and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, at, done, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous host tensor's bytes. Not `numpy()`: that marks the storage
    as never to be resized, and a chunk's payload is resized to nothing when it is evicted."""
    return memoryview((ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())).cast("B")


class _SafetensorsSlice:
    def __init__(self, reader: SafetensorsReader, name: str) -> None:
        self.reader, self.name = reader, name

    def get_shape(self) -> list[int]:
        return list(self.reader._entry(self.name)[1])

    def get_dtype(self) -> str:
        return SAFETENSORS_DTYPES[self.reader._entry(self.name)[0]]

    def __getitem__(self, index) -> torch.Tensor:
        """A box of the tensor (unit-step slices per dimension): read as the runs of bytes it is
        made of, each run the part of the box that lies contiguous in the file."""
        dtype, shape, begin, _ = self.reader._entry(self.name)
        index = index if isinstance(index, tuple) else (index,)
        if (not shape or len(index) > len(shape)
                or any(not isinstance(i, slice) or i.step not in (None, 1) for i in index)):
            return self.reader.get_tensor(self.name)[index]
        box = [i.indices(n)[:2] for i, n in zip(index, shape)] + [(0, n) for n in shape[len(index):]]
        box = [(lo, max(lo, hi)) for lo, hi in box]
        sizes = tuple(hi - lo for lo, hi in box)
        if math.prod(sizes) == 0:
            return torch.empty(sizes, dtype=dtype)
        # from dimension k on the box is contiguous: the dimensions after k whole, k a range
        k = len(shape) - 1
        while k > 0 and box[k] == (0, shape[k]):
            k -= 1
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        run = sizes[k] * strides[k] * dtype.itemsize
        starts = [box[k][0] * strides[k]]
        for d in reversed(range(k)):
            starts = [i * strides[d] + s for i in range(*box[d]) for s in starts]
        if len(starts) > 4096 and run < 2**18:
            # many short runs: read the whole rows of the first dimension and cut the box from them
            lo, hi = box[0]
            rows = self.reader._read(begin + lo * strides[0] * dtype.itemsize, begin + hi * strides[0] * dtype.itemsize)
            rows = rows.view(dtype).reshape((hi - lo, *shape[1:]))
            return rows[(slice(None), *(slice(a, b) for a, b in box[1:]))].clone()
        out = torch.empty(len(starts) * run, dtype=torch.uint8)
        view = _bytes_of(out)
        for n, start in enumerate(starts):
            self.reader._read_into(view[n * run:(n + 1) * run], begin + start * dtype.itemsize)
        return out.view(dtype).reshape(sizes)
