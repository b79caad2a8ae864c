"""`python -m core.checkpoint.convert IN OUT --to unsplit|hf|sharded`: a checkpoint's weights in
another form, one tensor in memory at a time (peak memory about the largest tensor), so a checkpoint
that no single rank could gather becomes a plain file on a small machine.

    unsplit   OUT/model.safetensors: the plain model's state dict (tied weights once, as Loom's
              unsplit checkpoints and `safetensors.torch.save_model` store them)
    hf        OUT/model-00001-of-0000N.safetensors ... and model.safetensors.index.json, Hugging
              Face's sharded layout (`--max-shard-mb` per file)
    sharded   OUT in Loom's sharded format (`core.checkpoint.sharded`), one piece per tensor

IN is a Loom checkpoint folder in either format (sharded.json or model.safetensors). Only the
weights (and persistent buffers) are converted; config.yaml and meta.json are copied along, so the
result starts a run with `train.init_weights=OUT` and loads in the apps' generate / sample commands.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Iterator

import torch

from core.checkpoint.reader import SafetensorsReader
from core.checkpoint.sharded import VERSION, ShardReader, is_sharded, write_index
from core.errors import LoomError

_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
MODEL = "model.safetensors"


class Source:
    """The weights of a checkpoint folder by name, read one at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if is_sharded(self.folder):
            self.reader = ShardReader(self.folder)
            self.index = self.reader.index
            self.names = {}
            for key in self.reader.names():
                kind, _, name = key.partition(":")
                if kind in ("model", "buffer"):
                    self.names[name] = key
            self.ties = [tuple(g) for g in self.index.get("ties", [])]
        elif (self.folder / MODEL).is_file():
            self.reader = None
            self.file = SafetensorsReader(self.folder / MODEL)
            self.names = {k: k for k in self.file.keys()}
            meta = self.file.metadata() or {}
            groups: dict[str, list[str]] = {}
            for other, kept in meta.items():
                if kept in self.names:
                    groups.setdefault(kept, [kept]).append(other)
            self.ties = [tuple(sorted(g)) for g in groups.values()]
        else:
            raise LoomError(f"{self.folder}: not a Loom checkpoint (neither sharded.json nor {MODEL})")

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self.reader is not None:
            key = self.names[name]
            return self.reader.shape(key), self.reader.dtype(key)
        s = self.file.get_slice(name)
        return tuple(s.get_shape()), _dtype_of(s.get_dtype())

    def read(self, name: str) -> torch.Tensor:
        if self.reader is not None:
            return self.reader.read(self.names[name])
        return self.file.get_tensor(name)

    def tie_metadata(self) -> dict[str, str]:
        """Each other name of a tied tensor -> the name it is stored under."""
        return {other: group[0] for group in self.ties for other in group[1:] if group[0] in self.names}


class _Renamed:
    """A source's weights under the names of one whole piece each in the sharded format."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.names = {}
        for name in sorted(source.names):
            key = source.names[name] if source.reader is not None else f"model:{name}"
            shape, _ = source.shape_dtype(name)
            self.names[f"{key}@{','.join('0' * len(shape))}"] = name

    def shape_dtype(self, piece: str):
        return self.source.shape_dtype(self.names[piece])

    def read(self, piece: str) -> torch.Tensor:
        return self.source.read(self.names[piece])


def _dtype_of(code: str) -> torch.dtype:
    for dtype, c in _CODES.items():
        if c == code:
            return dtype
    raise LoomError(f"dtype {code} is not converted")


def write_streaming(path: Path, source: Source, names: list[str], metadata: dict[str, str] | None = None) -> int:
    """A safetensors file of `names`, each read and written on its own; returns the bytes of data."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    at = 0
    for name in names:
        shape, dtype = source.shape_dtype(name)
        size = (torch.Size(shape).numel()) * torch.tensor([], dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            t = source.read(name).contiguous()
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del t
    tmp.replace(path)
    return at


def unsplit_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint (either format) by its stored name, whole (for tests and tools
    on small models: this holds them all)."""
    source = Source(folder)
    return {name: source.read(name) for name in sorted(source.names)}


def _groups(source: Source, max_bytes: int) -> Iterator[list[str]]:
    group, size = [], 0
    for name in sorted(source.names):
        shape, dtype = source.shape_dtype(name)
        n = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        if group and size + n > max_bytes:
            yield group
            group, size = [], 0
        group.append(name)
        size += n
    if group:
        yield group


def convert(src: Path, out: Path, to: str, max_shard_mb: float = 5000.0) -> list[Path]:
    source = Source(src)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LoomError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if to == "unsplit":
        write_streaming(out / MODEL, source, sorted(source.names), source.tie_metadata() or None)
        written.append(out / MODEL)
    elif to == "hf":
        groups = list(_groups(source, int(max_shard_mb * 2**20)))
        weight_map, total = {}, 0
        for i, names in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            total += write_streaming(out / name, source, names, {"format": "pt"})
            weight_map.update({n: name for n in names})
            written.append(out / name)
        weight_map.update({other: weight_map[kept] for other, kept in source.tie_metadata().items()})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
            + "\n")
    elif to == "sharded":
        pieces = _Renamed(source)
        (out / "shards").mkdir()
        write_streaming(out / "shards" / "rank_00000.safetensors", pieces, list(pieces.names),
                        {"format": "loom-sharded"})
        tensors = {}
        for piece, name in pieces.names.items():
            shape, dtype = source.shape_dtype(name)
            tensors[piece.rpartition("@")[0]] = {
                "shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                "pieces": [{"key": piece, "offsets": [0] * len(shape), "sizes": list(shape),
                            "file": "shards/rank_00000.safetensors"}]}
        write_index(out, {"format": "loom-sharded", "version": VERSION, "ties": [list(g) for g in source.ties],
                          "tensors": dict(sorted(tensors.items()))})
        written.append(out / "sharded.json")
    else:
        raise LoomError(f"--to {to}: choose unsplit, hf or sharded")
    for extra in ("config.yaml", "meta.json"):
        if (Path(src) / extra).is_file():
            shutil.copy2(Path(src) / extra, out / extra)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.checkpoint.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="a Loom checkpoint folder (sharded or unsplit)")
    ap.add_argument("out", type=Path, help="a new folder")
    ap.add_argument("--to", required=True, choices=("unsplit", "hf", "sharded"))
    ap.add_argument("--max-shard-mb", type=float, default=5000.0, help="largest file of --to hf (MiB)")
    args = ap.parse_args(argv)
    try:
        written = convert(args.src, args.out, args.to, args.max_shard_mb)
    except LoomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
