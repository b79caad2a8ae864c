"""`python -m core.checkpoint.convert`: a sharded checkpoint becomes a plain model.safetensors, or
Hugging Face's sharded files with an index, or back, one tensor in memory at a time."""

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.checkpoint import convert as conv
from core.checkpoint.sharded import Held, ShardReader, ShardWriter, merge, write_index
from core.tensor.modes import grouped_index, split_index


def _sharded(folder):
    """Weights written by two tensor-parallel ranks, ZeRO-split over two more, a tie, a buffer."""
    torch.manual_seed(0)
    weights = {"emb.weight": torch.randn(12, 8), "blocks.0.fc.weight": torch.randn(16, 8),
               "norm.bias": torch.randn(8).to(torch.bfloat16)}
    parts = []
    for tp in range(2):
        for dp in range(2):
            w = ShardWriter()
            for name, value in weights.items():
                index = (grouped_index(value.shape[0], 2, 2, tp), None) if value.dim() == 2 else (split_index(8, 2, tp),)
                held = Held.from_index(value.shape, index)
                mine = value[torch.meshgrid(*[torch.as_tensor(i) if i is not None else torch.arange(n)
                                              for i, n in zip(index, value.shape)], indexing="ij")].reshape(-1)
                cut = mine.numel() // 2
                w.add(f"model:{name}", mine[dp * cut:(dp + 1) * cut], held, (dp * cut, (dp + 1) * cut))
            if tp == dp == 0:
                w.add("buffer:gain", torch.arange(4.0))
            parts.append(w.write(folder, tp * 2 + dp))
    write_index(folder, merge(parts, ties=[["emb.weight", "head.weight"]]))
    (folder / "config.yaml").write_text("model: {}\n")
    return {**weights, "gain": torch.arange(4.0)}


def test_sharded_to_unsplit_hf_and_back(tmp_path):
    weights = _sharded(tmp_path / "in")
    assert conv.main([str(tmp_path / "in"), str(tmp_path / "plain"), "--to", "unsplit"]) == 0
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert plain.keys() == weights.keys() and all(torch.equal(plain[k], v) for k, v in weights.items())
    from safetensors import safe_open
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"head.weight": "emb.weight"}          # as Loom's unsplit files tie
    assert (tmp_path / "plain" / "config.yaml").is_file()

    assert conv.main([str(tmp_path / "in"), str(tmp_path / "hf"), "--to", "hf", "--max-shard-mb", "0.0005"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and index["weight_map"]["head.weight"] == index["weight_map"]["emb.weight"]
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / "hf" / f))
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], v) for k, v in weights.items())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in weights.values())

    # an unsplit file becomes a sharded folder that any layout reads, and round-trips
    assert conv.main([str(tmp_path / "plain"), str(tmp_path / "again"), "--to", "sharded"]) == 0
    reader = ShardReader(tmp_path / "again")
    assert reader.index["ties"] == [["emb.weight", "head.weight"]]
    fc = reader.read("model:blocks.0.fc.weight", Held.from_index((16, 8), (split_index(16, 4, 3), None)))
    assert torch.equal(fc, weights["blocks.0.fc.weight"][12:16])
    assert conv.unsplit_weights(tmp_path / "again").keys() == weights.keys()


def test_one_tensor_in_memory_at_a_time(tmp_path, monkeypatch):
    _sharded(tmp_path / "in")
    alive = []
    real = conv.Source.read

    def read(self, name):
        t = real(self, name)
        assert all(ref() is None for ref in alive), "an earlier tensor is still held"
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(conv.Source, "read", read)
    for to in ("unsplit", "hf", "sharded"):
        alive.clear()
        conv.convert(tmp_path / "in", tmp_path / to, to)
        assert len(alive) == 4


def test_bad_folders_get_one_line(tmp_path, capsys):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    assert conv.main([str(tmp_path / "nothing"), str(tmp_path / "o1"), "--to", "unsplit"]) == 2
    assert capsys.readouterr().err.strip().endswith("not a Loom checkpoint (neither sharded.json nor model.safetensors)")
    _sharded(tmp_path / "in")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert conv.main([str(tmp_path / "in"), str(tmp_path / "full"), "--to", "unsplit"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        conv.main([str(tmp_path / "in"), str(tmp_path / "o2"), "--to", "pickle"])
