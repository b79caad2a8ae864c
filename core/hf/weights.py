"""A Hugging Face model folder's weights, read one tensor at a time, and a planned model written
back as a folder transformers loads.

`WeightSource` opens `model.safetensors`, a sharded `model.safetensors.index.json`, or
`pytorch_model.bin` (memory-mapped), and hands out tensors by name (safetensors files read tensor by
tensor, never mapped whole: `core.checkpoint.reader.SafetensorsReader`), so that a model made on the
meta device reads each parameter where it will live and never holds the whole file. `save_folder`
writes `config.json` and `model.safetensors` in transformers' layout (GPT-2's Conv1D weights
transposed back, a tied head left out as transformers leaves it out), atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch

from core.checkpoint.reader import SafetensorsReader
from core.errors import LoomError

SAFETENSORS, INDEX, BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


class WeightSource:
    """Tensors of a model folder by name; `names` lists them. A folder with only config.json has none."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._files: dict[str, Path] = {}      # tensor name -> file
        self._open: dict[Path, object] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        if (self.folder / SAFETENSORS).is_file():
            self._index_file(self.folder / SAFETENSORS)
        elif (self.folder / INDEX).is_file():
            try:
                index = json.loads((self.folder / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise LoomError(f"{self.folder / INDEX}: not a safetensors index ({e})") from None
            self._files = {name: self.folder / file for name, file in index.items()}
            absent = sorted({str(f) for f in self._files.values() if not f.is_file()})
            if absent:
                raise LoomError(f"{self.folder / INDEX} names files that are not there: {', '.join(absent[:3])}")
        elif (self.folder / BIN).is_file():
            try:
                self._bin = torch.load(self.folder / BIN, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:                                  # noqa: BLE001 - any unreadable file
                raise LoomError(f"{self.folder / BIN}: cannot be read as a PyTorch state dict ({e})") from None

    def _index_file(self, path: Path) -> None:
        self._open[path] = SafetensorsReader(path)          # a damaged file is refused here, by name
        self._files.update({name: path for name in self._open[path].keys()})

    @property
    def names(self) -> list[str]:
        return list(self._bin) if self._bin is not None else list(self._files)

    def __bool__(self) -> bool:
        return bool(self.names)

    def __contains__(self, name: str) -> bool:
        return name in (self._bin if self._bin is not None else self._files)

    def get(self, name: str) -> torch.Tensor | None:
        if self._bin is not None:
            return self._bin.get(name)
        path = self._files.get(name)
        if path is None:
            return None
        return self._reader(path, name).get_tensor(name)

    def read_into(self, name: str, out: torch.Tensor) -> bool:
        """Tensor `name` read straight into `out` where it is stored as `out` is (dtype, shape) in a
        safetensors file and `out` is contiguous host memory: a 515 MB embedding then never exists
        twice. False, reading nothing, otherwise (`get` it)."""
        path = self._files.get(name) if self._bin is None else None
        return path is not None and self._reader(path, name).read_into(name, out)

    def _reader(self, path: Path, name: str) -> SafetensorsReader:
        if path not in self._open:
            if not path.is_file():
                raise LoomError(f"{path} is missing: the folder's index names it for {name}")
            self._open[path] = SafetensorsReader(path)
        return self._open[path]


def write_folder(folder: str | Path, config, state: Iterable[tuple[str, torch.Tensor]],
                 skip: Iterable[str] = ()) -> None:
    """Write `config` (a transformers config) and the tensors of `state` (Hugging Face names and
    layout; `skip`: names left out, such as a tied head) into `folder`, as save_pretrained would."""
    from safetensors.torch import save_file

    skip = set(skip)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state if name not in skip}
    save_file(tensors, str(Path(folder) / SAFETENSORS), metadata={"format": "pt"})
    config.save_pretrained(str(folder))


def save_folder(out: str | Path, config, state: Iterable[tuple[str, torch.Tensor]], skip: Iterable[str] = ()) -> Path:
    """`write_folder` into `out`, atomically: the folder appears whole or not at all."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_folder(tmp, config, state, skip)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
