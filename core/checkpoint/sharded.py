"""The sharded checkpoint format: every rank writes the pieces it owns, any layout reads them.

    sharded.json                  the index: each tensor's global shape and dtype, and its pieces
    shards/rank_00003.safetensors the pieces rank 3 wrote (an ordinary safetensors file)

A piece is a box of one global tensor: `offsets` and `sizes` per dimension, the same description
as `torch.distributed.checkpoint`'s chunk metadata. Every way Loom splits a tensor cuts it into
such boxes:

- tensor parallelism holds, per dimension, a list of the serial indices (`TPMode.param_index`);
  runs of consecutive indices are boxes (attention's fused q|k|v gives three runs per rank);
- ZeRO holds a contiguous range of the flattened (tensor-parallel part of the) tensor; a range of
  a row-major tensor is at most 2 x ndim - 1 boxes: a part of one row, whole rows, a part of a row.

A piece is stored at its box's shape, so safetensors memory-maps it and `get_slice` reads only the
rows and columns a reader asks for: a rank that loads its part of a tensor reads the bytes of its
part, never the whole tensor. Tensors are named freely by the caller ("param:h.0.attn.weight",
"exp_avg:h.0.attn.weight"); an optimizer state that is elementwise in its parameter is split as
the parameter is and so reshards with it.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import save_file

from core.checkpoint.reader import SafetensorsReader
from core.errors import LoomError

INDEX = "sharded.json"
SHARDS = "shards"
VERSION = 1

Runs = tuple[tuple[int, int], ...]     # (first global index, length) of each run, in held order


# ------------------------------------------------------------------------------------ geometry

def runs_of(index: torch.Tensor | Sequence[int] | None, n: int) -> Runs:
    """The runs of a dimension that holds the serial indices `index` (None: all `n` of them)."""
    if index is None:
        return ((0, n),)
    idx = [int(i) for i in index]
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return tuple((a, b) for a, b in runs)


@dataclass(frozen=True)
class Held:
    """How a rank holds a tensor of global shape `shape`: per dimension, the runs of global
    indices along that dimension of the tensor it holds (the whole tensor: one run per dimension)."""

    shape: tuple[int, ...]
    runs: tuple[Runs, ...]

    @staticmethod
    def whole(shape: Sequence[int]) -> "Held":
        shape = tuple(int(n) for n in shape)
        return Held(shape, tuple(((0, n),) for n in shape))

    @staticmethod
    def from_index(shape: Sequence[int], index: Sequence) -> "Held":
        """From `TPMode.param_index`'s answer: per dimension the serial indices held, or None."""
        shape = tuple(int(n) for n in shape)
        index = tuple(index) + (None,) * (len(shape) - len(tuple(index)))
        return Held(shape, tuple(runs_of(i, n) for i, n in zip(index, shape)))

    @property
    def held_shape(self) -> tuple[int, ...]:
        return tuple(sum(length for _, length in dim) for dim in self.runs)

    def boxes(self) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(global offsets, held offsets, sizes) of each box of the held tensor."""
        per_dim = []
        for dim in self.runs:
            at, out = 0, []
            for start, length in dim:
                out.append((start, at, length))
                at += length
            per_dim.append(out)
        for combo in itertools.product(*per_dim):
            yield tuple(c[0] for c in combo), tuple(c[1] for c in combo), tuple(c[2] for c in combo)


def flat_boxes(shape: Sequence[int], start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The boxes (offsets, sizes) that elements [start, stop) of a row-major tensor of `shape`
    make, in order; each is contiguous in the flat order, so box k's elements are the next
    prod(sizes) elements of the range."""
    shape = tuple(int(n) for n in shape)
    out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    if not shape:
        return [((), ())] if start < stop else []

    def split(prefix: tuple[int, ...], dims: tuple[int, ...], a: int, b: int) -> None:
        # elements [a, b) of the sub-tensor at index `prefix`, whose dimensions are `dims`
        if a >= b:
            return
        ones = (1,) * len(prefix)
        if len(dims) == 1:
            out.append((prefix + (a,), ones + (b - a,)))
            return
        inner = math.prod(dims[1:])
        first, last = -(-a // inner), b // inner          # the whole rows are [first, last)
        if first > last:                                  # inside one row
            row = a // inner
            split(prefix + (row,), dims[1:], a - row * inner, b - row * inner)
            return
        if a % inner:
            split(prefix + (a // inner,), dims[1:], a % inner, inner)
        if last > first:
            out.append((prefix + (first,) + (0,) * (len(dims) - 1), ones + (last - first,) + dims[1:]))
        if b % inner:
            split(prefix + (last,), dims[1:], 0, b % inner)

    split((), shape, start, stop)
    return out


def _intersect(a_off, a_size, b_off, b_size):
    lo = [max(x, y) for x, y in zip(a_off, b_off)]
    hi = [min(x + n, y + m) for x, n, y, m in zip(a_off, a_size, b_off, b_size)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return tuple(lo), tuple(h - l for l, h in zip(lo, hi))


def _slices(offsets, sizes, origin=None):
    origin = origin or (0,) * len(offsets)
    return tuple(slice(o - z, o - z + n) for o, n, z in zip(offsets, sizes, origin))


def _pieces(held: Held, flat: tuple[int, int] | None):
    """(global offsets, sizes, where in the caller's tensor) of each box of what a rank holds:
    `where` is (held offsets) for a held tensor, or (flat position) for a flat range of it."""
    if flat is None:
        for g, h, n in held.boxes():
            yield g, n, h
        return
    start, stop = flat
    hshape = held.held_shape
    pos = 0
    for h_off, h_size in flat_boxes(hshape, start, stop):
        for g, hb, n in held.boxes():            # the runs that this flat box crosses
            hit = _intersect(h_off, h_size, hb, n)
            if hit is None:
                continue
            lo, size = hit
            yield tuple(gg + (l - b) for gg, l, b in zip(g, lo, hb)), size, (pos, h_off, h_size, lo)
        pos += math.prod(h_size)


# ------------------------------------------------------------------------------------ writing

class ShardWriter:
    """The pieces one rank writes: `add` what it owns, then `write` (every rank its own file)."""

    def __init__(self, copy: bool = False) -> None:
        self.copy = copy           # keep copies (the files are written later, while training goes on)
        self.tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, dict] = {}

    def add(self, name: str, value: torch.Tensor, held: Held | None = None,
            flat: tuple[int, int] | None = None) -> None:
        """Own `value`: the held tensor of `held` (default: the whole tensor, at value's shape),
        or with `flat` = (start, stop) elements [start, stop) of the flattened held tensor, as a
        1-D tensor."""
        held = held or Held.whole(value.shape)
        value = value.detach()
        if flat is None and tuple(value.shape) != held.held_shape:
            raise ValueError(f"{name}: holds {tuple(value.shape)}, its layout says {held.held_shape}")
        if flat is not None and value.numel() != flat[1] - flat[0]:
            raise ValueError(f"{name}: {value.numel()} elements for the flat range {flat}")
        entry = self.entries.setdefault(name, {"shape": list(held.shape), "dtype": _dtype_name(value.dtype),
                                              "pieces": []})
        if entry["shape"] != list(held.shape) or entry["dtype"] != _dtype_name(value.dtype):
            raise ValueError(f"{name}: added twice with different shapes or dtypes")
        for g, size, where in _pieces(held, flat):
            if flat is None:
                part = value[_slices(where, size)]
            else:
                pos, h_off, h_size, lo = where
                box = value[pos:pos + math.prod(h_size)].view(h_size)
                part = box[_slices(lo, size, h_off)]
            key = f"{name}@{','.join(map(str, g))}"
            self.tensors[key] = part.to("cpu", copy=True).contiguous() if self.copy else part.contiguous().cpu()
            entry["pieces"].append({"key": key, "offsets": list(g), "sizes": list(size)})

    @staticmethod
    def file_of(rank: int) -> str:
        return f"{SHARDS}/rank_{rank:05d}.safetensors"

    def part(self, rank: int) -> dict:
        """This rank's part of the index (`merge` joins the parts), before or after `write`."""
        for entry in self.entries.values():
            for piece in entry["pieces"]:
                piece["file"] = self.file_of(rank)
        return self.entries

    def write(self, folder: Path, rank: int) -> dict:
        """Write this rank's file; returns its part of the index."""
        path = Path(folder) / self.file_of(rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(path), metadata={"format": "loom-sharded", "version": str(VERSION)})
        return self.part(rank)


def merge(parts: Sequence[dict], **info) -> dict:
    """The index of a checkpoint from every rank's part. Replicas that wrote the same box (ranks
    of a data-parallel group that each own a copy) are listed once."""
    tensors: dict[str, dict] = {}
    for part in parts:
        for name, entry in part.items():
            into = tensors.setdefault(name, {"shape": entry["shape"], "dtype": entry["dtype"], "pieces": []})
            if into["shape"] != entry["shape"] or into["dtype"] != entry["dtype"]:
                raise LoomError(f"{name}: ranks disagree on its shape or dtype ({into['shape']} {into['dtype']} "
                                f"vs {entry['shape']} {entry['dtype']})")
            seen = {(tuple(p["offsets"]), tuple(p["sizes"])) for p in into["pieces"]}
            into["pieces"].extend(p for p in entry["pieces"] if (tuple(p["offsets"]), tuple(p["sizes"])) not in seen)
    for name, entry in tensors.items():
        covered = sum(math.prod(p["sizes"]) for p in entry["pieces"])
        if covered != math.prod(entry["shape"]):
            raise LoomError(f"{name}: the pieces written cover {covered} of its {math.prod(entry['shape'])} elements")
    return {"format": "loom-sharded", "version": VERSION, **info, "tensors": dict(sorted(tensors.items()))}


def write_index(folder: Path, index: dict) -> None:
    (Path(folder) / INDEX).write_text(json.dumps(index, indent=1) + "\n")


# ------------------------------------------------------------------------------------ reading

class ShardReader:
    """Reads any part of any tensor of a sharded checkpoint, touching only the pieces (and within
    them the rows and columns) that the part overlaps."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        path = self.folder / INDEX
        try:
            self.index = json.loads(path.read_text())
        except FileNotFoundError:
            raise LoomError(f"{self.folder} is not a sharded checkpoint (no {INDEX})") from None
        except ValueError as e:
            raise LoomError(f"{path} cannot be read: {e}") from None
        if self.index.get("format") != "loom-sharded" or self.index.get("version", 0) > VERSION:
            raise LoomError(f"{path}: not a Loom sharded index this version reads "
                            f"(format {self.index.get('format')!r}, version {self.index.get('version')})")
        self.tensors: dict[str, dict] = self.index["tensors"]
        self._files: dict[str, object] = {}
        self.bytes_read = 0           # what the slices read so far added up to

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def tied(self, key: str) -> str:
        """`key` ("model:NAME"), or the key its tensor is stored under when NAME is another name
        of a tied tensor (the index's "ties")."""
        if key in self.tensors:
            return key
        kind, _, name = key.partition(":")
        for group in self.index.get("ties", []):
            if name in group:
                for other in group:
                    if f"{kind}:{other}" in self.tensors:
                        return f"{kind}:{other}"
        return key

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entry(name)["dtype"]]

    def _entry(self, name: str) -> dict:
        try:
            return self.tensors[name]
        except KeyError:
            raise LoomError(f"{name} is not in the checkpoint {self.folder}") from None

    def _open(self, file: str):
        if file not in self._files:
            path = self.folder / file
            if not path.is_file():
                raise LoomError(f"{path} is missing: the checkpoint is incomplete")
            self._files[file] = SafetensorsReader(path)
        return self._files[file]

    def read(self, name: str, held: Held | None = None, flat: tuple[int, int] | None = None) -> torch.Tensor:
        """The part of tensor `name` that `held` (default: the whole tensor) and `flat` describe,
        as `ShardWriter.add` takes them."""
        entry = self._entry(name)
        shape = tuple(entry["shape"])
        held = held or Held.whole(shape)
        if held.shape != shape:
            raise LoomError(f"{name} is {shape} in {self.folder} and {held.shape} in this model")
        dtype = _DTYPES[entry["dtype"]]
        out = torch.empty(held.held_shape if flat is None else (flat[1] - flat[0],), dtype=dtype)
        filled = 0
        for g, size, where in _pieces(held, flat):
            if flat is None:
                target = out[_slices(where, size)]
            else:
                pos, h_off, h_size, lo = where
                target = out[pos:pos + math.prod(h_size)].view(h_size)[_slices(lo, size, h_off)]
            for piece in entry["pieces"]:
                hit = _intersect(g, size, piece["offsets"], piece["sizes"])
                if hit is None:
                    continue
                lo_g, n = hit
                part = self._open(piece["file"]).get_slice(piece["key"])[_slices(lo_g, n, piece["offsets"])]
                target[_slices(lo_g, n, g)] = part
                self.bytes_read += part.numel() * part.element_size()
                filled += math.prod(n)
        if filled != out.numel():
            raise LoomError(f"{name}: the checkpoint's pieces cover {filled} of the {out.numel()} elements asked for")
        return out


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
           "bool": torch.bool}


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} is not stored in sharded checkpoints")
    return name


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / INDEX).is_file()
