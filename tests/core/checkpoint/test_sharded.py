"""The sharded format on its own: pieces written under one split read back under any other, each
read touching only the bytes it asks for; the files are plain safetensors."""

import math
import random

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint.sharded import Held, ShardReader, ShardWriter, flat_boxes, merge, runs_of, write_index
from core.errors import LoomError
from core.tensor.modes import grouped_index, split_index


def test_a_flat_range_is_a_few_boxes_in_order():
    for shape in [(7,), (3, 5), (2, 3, 4), (4, 1, 3, 2)]:
        n = math.prod(shape)
        t = torch.arange(n).view(shape)
        for a in range(n + 1):
            for b in range(a, n + 1):
                boxes = flat_boxes(shape, a, b)
                got = [t[tuple(slice(o, o + s) for o, s in zip(off, size))].reshape(-1) for off, size in boxes]
                assert torch.equal(torch.cat(got) if got else torch.empty(0, dtype=torch.long), torch.arange(a, b))
                assert len(boxes) <= 2 * len(shape) - 1


def test_runs_follow_the_held_order():
    assert runs_of(None, 6) == ((0, 6),)
    assert runs_of(grouped_index(12, 3, 2, 1), 12) == ((2, 2), (6, 2), (10, 2))   # q|k|v, second half of each
    assert runs_of([5, 6, 0, 1, 2], 7) == ((5, 2), (0, 3))


def _split(shape, index, dp, value):
    """What each rank of a (tp split `index` per tp rank) x (ZeRO over `dp`) layout holds:
    (Held, flat range or None, its tensor)."""
    out = []
    for idx in index:
        held = Held.from_index(shape, idx)
        part = value[torch.meshgrid(*[torch.arange(n) if i is None else torch.as_tensor(i)
                                      for n, i in zip(shape, idx)], indexing="ij")]
        n = part.numel()
        if dp == 1:
            out.append((held, None, part))
            continue
        cuts = [n * k // dp for k in range(dp + 1)]
        for a, b in zip(cuts, cuts[1:]):
            out.append((held, (a, b), part.reshape(-1)[a:b].clone()))
    return out


def _write(folder, layouts, values):
    """Each (name -> split) of `layouts` written as if by as many ranks as the split has parts."""
    parts = []
    ranks = max(len(s) for s in layouts.values())
    for rank in range(ranks):
        w = ShardWriter()
        for name, split in layouts.items():
            if rank < len(split):
                held, flat, value = split[rank]
                w.add(name, value, held, flat)
        parts.append(w.write(folder, rank))
    index = merge(parts, step=3)
    write_index(folder, index)
    return index


SHAPE = (12, 8)
ONE_D_QKV = [(grouped_index(12, 3, 2, r), None) for r in range(2)]          # column split of a fused q|k|v
ROW = [(None, split_index(8, 4, r)) for r in range(4)]                       # row-parallel: input features
GRID = [(split_index(12, 2, i), split_index(8, 2, j)) for i in range(2) for j in range(2)]   # 2D: blocks
WHOLE = [(None, None)]


@pytest.mark.parametrize("written, read", [
    ((ONE_D_QKV, 1), (GRID, 3)),          # tp2 1d -> 2d x ZeRO over 3
    ((GRID, 2), (ONE_D_QKV, 1)),          # 2d x ZeRO over 2 -> tp2 1d
    ((WHOLE, 4), (ROW, 2)),               # ZeRO over 4 -> row split x ZeRO over 2
    ((ROW, 1), (WHOLE, 1)),               # row split -> one process
    ((ONE_D_QKV, 3), (ONE_D_QKV, 2)),     # same tp, another dp
])
def test_written_in_one_split_read_in_another(tmp_path, written, read):
    torch.manual_seed(0)
    value = torch.randn(SHAPE)
    state = torch.randn(SHAPE)        # an optimizer state: split like its parameter
    _write(tmp_path, {"param:w": _split(SHAPE, [i for i in written[0]], written[1], value),
                      "exp_avg:w": _split(SHAPE, [i for i in written[0]], written[1], state)}, {})
    reader = ShardReader(tmp_path)
    assert reader.shape("param:w") == SHAPE and reader.dtype("param:w") == torch.float32
    for held, flat, want in _split(SHAPE, read[0], read[1], value):
        before = reader.bytes_read
        got = reader.read("param:w", held, flat)
        assert torch.equal(got, want)
        assert reader.bytes_read - before == want.numel() * 4          # only the bytes asked for
    for held, flat, want in _split(SHAPE, read[0], read[1], state):
        assert torch.equal(reader.read("exp_avg:w", held, flat), want)


def test_random_splits_read_back_exactly(tmp_path):
    rng = random.Random(0)
    for trial in range(25):
        nd = rng.randint(1, 3)
        shape = tuple(rng.randint(1, 6) for _ in range(nd))
        value = torch.randn(shape, dtype=rng.choice([torch.float32, torch.bfloat16]))

        def random_split():
            per_dim = []
            for n in shape:
                perm = list(range(n))
                rng.shuffle(perm)
                parts = rng.randint(1, n)
                cuts = sorted(rng.sample(range(1, n), parts - 1)) if parts > 1 else []
                bounds = [0, *cuts, n]
                per_dim.append([sorted(perm[a:b]) for a, b in zip(bounds, bounds[1:])])
            return [tuple(c) for c in __import__("itertools").product(*per_dim)], rng.randint(1, 3)

        folder = tmp_path / str(trial)
        index, dp = random_split()
        _write(folder, {"t": _split(shape, index, dp, value)}, {})
        reader = ShardReader(folder)
        index, dp = random_split()
        for held, flat, want in _split(shape, index, dp, value):
            assert torch.equal(reader.read("t", held, flat), want), (shape, held, flat)
        assert torch.equal(reader.read("t"), value)


def test_each_rank_file_is_plain_safetensors_and_replicas_are_listed_once(tmp_path):
    value = torch.randn(SHAPE)
    # two data-parallel replicas each write the same tp part: the index lists each box once
    index = _write(tmp_path, {"w": [*_split(SHAPE, ONE_D_QKV, 1, value), *_split(SHAPE, ONE_D_QKV, 1, value)]}, {})
    assert len(index["tensors"]["w"]["pieces"]) == 6 and index["step"] == 3
    pieces = load_file(tmp_path / "shards" / "rank_00000.safetensors")
    assert {tuple(v.shape) for v in pieces.values()} == {(2, 8)}
    assert sorted(pieces) == ["w@0,0", "w@4,0", "w@8,0"] and torch.equal(pieces["w@4,0"], value[4:6])


def test_missing_pieces_and_mismatches_are_refused(tmp_path):
    value = torch.randn(SHAPE)
    w = ShardWriter()
    held, flat, part = _split(SHAPE, ONE_D_QKV, 1, value)[0]
    w.add("w", part, held)
    with pytest.raises(LoomError, match="cover 48 of its 96 elements"):
        merge([w.write(tmp_path, 0)])
    _write(tmp_path, {"w": _split(SHAPE, ONE_D_QKV, 1, value)}, {})
    reader = ShardReader(tmp_path)
    with pytest.raises(LoomError, match=r"w is \(12, 8\) in .* and \(12, 9\) in this model"):
        reader.read("w", Held.whole((12, 9)))
    with pytest.raises(LoomError, match="is not in the checkpoint"):
        reader.read("v")
    (tmp_path / "shards" / "rank_00001.safetensors").unlink()
    with pytest.raises(LoomError, match="rank_00001.safetensors is missing"):
        ShardReader(tmp_path).read("w")
    with pytest.raises(LoomError, match="not a sharded checkpoint"):
        ShardReader(tmp_path / "shards")
