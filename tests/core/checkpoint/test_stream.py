"""The part-by-part safetensors writer: files that safetensors reads back exactly, and one clear
error (no file left) for a tensor that is missing, unplanned or misshapen."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import core.checkpoint.stream as stream
from core.checkpoint.stream import SafetensorsWriter, write_parts
from core.errors import LoomError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "big": torch.randn(300, 70, generator=g),
        "half": torch.randn(5, 3, generator=g).half(),
        "brain": torch.randn(7, generator=g).bfloat16(),
        "steps": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def test_parts_in_any_order_make_the_file_safetensors_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "PIECE", 1000)       # a tensor written in several system calls
    tensors = _tensors()
    specs = {k: (v.dtype, v.shape) for k, v in tensors.items()}
    parts = [{"mask": tensors["mask"], "big": tensors["big"]},
             {k: v for k, v in tensors.items() if k not in ("mask", "big")}]
    write_parts(tmp_path / "w.safetensors", specs, parts, metadata={"format": "pt"})
    back = load_file(str(tmp_path / "w.safetensors"))
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    raw = (tmp_path / "w.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0 and json.loads(raw[8:8 + n])["big"]["data_offsets"] == [0, 300 * 70 * 4]


def test_a_part_is_converted_to_the_planned_dtype(tmp_path):
    w = torch.randn(4, 4)
    write_parts(tmp_path / "w.safetensors", {"w": (torch.bfloat16, (4, 4))}, [{"w": w}])
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], w.bfloat16())


def test_mistakes_are_one_message_and_leave_no_file(tmp_path):
    path = tmp_path / "w.safetensors"
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (3,))}
    with pytest.raises(LoomError, match=r"w.safetensors: 1 tensors were never written \(b\)"):
        write_parts(path, specs, [{"a": torch.ones(2)}])
    assert not path.exists()
    with pytest.raises(LoomError, match="c is not one of the tensors"):
        write_parts(path, specs, [{"c": torch.ones(2)}])
    assert not path.exists()
    with pytest.raises(LoomError, match=r"b has shape \(2,\), planned \(3,\)"):
        with SafetensorsWriter(path, specs) as out:
            out.put("b", torch.ones(2))
    assert not path.exists()
    write_parts(None, specs, iter([{"a": torch.ones(2)}]))      # a rank that only takes part: writes nothing
    assert not path.exists()
