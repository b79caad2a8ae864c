"""`SafetensorsReader` reads what safetensors reads (every dtype, boxes of a tensor, metadata),
refuses damaged files by name, and opens a file larger than the address space it may map, where
safetensors' own torch loader cannot."""

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.checkpoint.reader import SafetensorsReader
from core.errors import LoomError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(6, 5, 4, generator=g),
        "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(5, generator=g).to(torch.float16),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(12).reshape(3, 4),
        "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "f8": torch.randn(4, 2, generator=g).to(torch.float8_e4m3fn),
    }


def test_every_tensor_slice_and_the_metadata_match_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path), metadata={"format": "pt", "tied": "f32"})
    ours = SafetensorsReader(path)
    theirs = safe_open(str(path), framework="pt")
    assert sorted(ours.keys()) == sorted(theirs.keys()) and ours.metadata() == theirs.metadata()
    for name, want in tensors.items():
        got = ours.get_tensor(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert ours.get_slice(name).get_shape() == list(want.shape)
        assert ours.get_slice(name).get_dtype() == theirs.get_slice(name).get_dtype()
    boxes = {"f32": [(slice(1, 4),), (slice(2, 5), slice(1, 3)), (slice(0, 6), slice(0, 5), slice(1, 2)),
                     (slice(3, 4), slice(0, 5), slice(0, 4)), (slice(4, 9),), (slice(5, 2),)],
             "bf16": [(slice(2, 7), slice(1, 2)), (slice(None), slice(0, 3))],
             "u8": [(slice(1, 2), slice(2, 3))], "f16": [(slice(1, 4),)]}
    for name, indices in boxes.items():
        for index in indices:
            got = ours.get_slice(name)[index]
            assert torch.equal(got, theirs.get_slice(name)[index]), (name, index)
            assert torch.equal(got, tensors[name][index]), (name, index)


def test_a_box_of_many_short_runs_reads_the_same(tmp_path):
    path = tmp_path / "wide.safetensors"
    t = torch.arange(5000 * 6, dtype=torch.float32).reshape(5000, 6)
    save_file({"t": t}, str(path))
    assert torch.equal(SafetensorsReader(path).get_slice("t")[10:4990, 2:4], t[10:4990, 2:4])


def test_damaged_files_are_refused_by_name(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(1000)}, str(good))
    data = good.read_bytes()
    cases = {"short": data[:4], "huge_header": struct.pack("<Q", 2**40) + data[8:],
             "not_json": struct.pack("<Q", 8) + b"{notjson" + data[16:]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(LoomError, match="damaged or not a safetensors file"):
            SafetensorsReader(tmp_path / name)
    (tmp_path / "truncated").write_bytes(data[:-100])
    with pytest.raises(LoomError, match="damaged or not a safetensors file"):
        SafetensorsReader(tmp_path / "truncated")
    with pytest.raises(LoomError, match="has no tensor nope"):
        SafetensorsReader(good).get_tensor("nope")


def test_a_file_larger_than_the_mappable_address_space_opens_and_reads(tmp_path):
    # A sparse 3 GiB file (a small tensor, then a big one) read in a process whose address space
    # is capped at 1 GiB above what it uses: safetensors' torch loader maps the whole file and is
    # refused (the check that this test can fail); the reader opens it and reads both tensors.
    path = tmp_path / "big.safetensors"
    header = {"small": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "big": {"dtype": "U8", "shape": [3 * 2**30], "data_offsets": [16, 16 + 3 * 2**30]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + struct.pack("<4f", 1, 2, 3, 4))
        f.truncate(8 + len(text) + 16 + 3 * 2**30)
    probe = textwrap.dedent(f"""
        import resource, torch
        from safetensors import safe_open
        from core.checkpoint.reader import SafetensorsReader
        used = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, used + 2**30))
        try:
            safe_open({str(path)!r}, framework="pt").get_tensor("small")
            print("safetensors: opened")
        except Exception as e:
            print("safetensors: refused")
        r = SafetensorsReader({str(path)!r})
        print(r.get_tensor("small").tolist(), int(r.get_slice("big")[2**31:2**31 + 8].sum()))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["safetensors: refused", "[1.0, 2.0, 3.0, 4.0] 0"], done.stdout


def test_read_into_fills_a_matching_tensor_in_place_and_declines_the_rest(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _tensors()
    save_file(tensors, str(path))
    reader = SafetensorsReader(path)
    for name in ("f32", "bf16", "mask", "scalar", "empty"):
        out = torch.empty_like(tensors[name])
        assert reader.read_into(name, out) and torch.equal(out, tensors[name]), name
    assert not reader.read_into("f32", torch.empty(6, 5, 4, dtype=torch.float64))      # another dtype
    assert not reader.read_into("f32", torch.empty(5, 6, 4))                            # another shape
    assert not reader.read_into("f32", torch.empty(4, 5, 6).permute(2, 1, 0))           # not contiguous
