"""Checkpoints carry every file's size and checksum; a damaged one is named as damaged and
`train.resume=latest` resumes from the newest intact one instead."""

import json
import os

import pytest
import torch
from torch import nn

from core.checkpoint import CheckpointIO, find_checkpoints
from core.checkpoint.manifest import verify
from core.distributed import Layout, ParallelMesh
from core.errors import LoomError
from core.trainer import Trainer
from tests.core.toy import MLP, StopAt, toy_recipe, toy_task

COMMON = ("train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5")


def _fit(cfg, **task_kw):
    trainer = Trainer(cfg, ParallelMesh.build(Layout()), toy_task(**task_kw))
    return trainer, trainer.fit()


def _truncate(path, keep=0.5):
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def test_every_file_is_listed_with_its_size_and_checksum(tmp_path):
    _fit(toy_recipe(tmp_path, *COMMON))
    folder = find_checkpoints(tmp_path / "checkpoints")[-1][1]
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk and "model.safetensors" in listed and "rng/rank_00000.pt" in listed
    assert all(listed[n]["bytes"] == (folder / n).stat().st_size for n in listed)
    assert verify(folder) is None

    # the same size, one byte changed: only the checksum can tell
    path = folder / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "checksum" in verify(folder)
    os.remove(folder / "state.pt")
    assert verify(folder) == "state.pt is missing"


def test_resume_latest_passes_over_a_truncated_checkpoint(tmp_path, capsys):
    unbroken, _ = _fit(toy_recipe(tmp_path / "a", *COMMON))
    with pytest.raises(KeyboardInterrupt):                          # killed during step 5
        _fit(toy_recipe(tmp_path / "b", *COMMON), loss_fn=StopAt(4))
    assert [s for s, _ in find_checkpoints(tmp_path / "b" / "checkpoints")] == [2, 4]
    newest = tmp_path / "b" / "checkpoints" / "step_0000004"
    _truncate(newest / "model.safetensors")
    capsys.readouterr()

    resumed, summary = _fit(toy_recipe(tmp_path / "b", *COMMON, "train.resume=latest"))
    err = capsys.readouterr().err
    assert "step_0000004 is damaged: model.safetensors has" in err and "truncated" in err
    assert "resuming from step_0000002" in err
    assert summary["step"] == 6 and sorted(resumed.step_losses) == [3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert resumed.step_losses[step] == unbroken.step_losses[step]
    a, b = unbroken.model.unwrap().state_dict(), resumed.model.unwrap().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_named_damaged_checkpoint_is_refused(tmp_path):
    _fit(toy_recipe(tmp_path, *COMMON[1:], "train.steps=2"))
    folder = tmp_path / "checkpoints" / "step_0000002"
    _truncate(folder / "model.safetensors")
    for key in (f"train.resume={folder}", f"train.init_weights={folder}"):
        trainer = Trainer(toy_recipe(tmp_path / "c", *COMMON, key), ParallelMesh.build(Layout()), toy_task())
        with pytest.raises(LoomError, match=r"step_0000002 is damaged: model.safetensors has .* bytes where"):
            trainer.fit()
        assert not (tmp_path / "c").exists()        # refused before anything was written


def test_a_truncated_weights_file_without_a_manifest_is_called_damaged(tmp_path):
    """Folders from before manifests: the safetensors reader's complaint is reported as damage,
    not as weights that do not fit the model."""
    model = MLP()
    CheckpointIO().save_model(model, tmp_path, rank=0)
    _truncate(tmp_path / "model.safetensors", keep=0.7)
    with pytest.raises(LoomError, match="is damaged or not a safetensors file") as e:
        CheckpointIO().load_model(MLP(), tmp_path)
    assert "do not fit" not in str(e.value)
    CheckpointIO().save_model(nn.Linear(3, 3), tmp_path, rank=0)     # intact, but another model
    with pytest.raises(LoomError, match="do not fit this model"):
        CheckpointIO().load_model(MLP(), tmp_path)


def test_a_refusal_at_start_writes_nothing(tmp_path):
    """Fewer samples than one global batch: refused before config.yaml or metrics.jsonl exist."""
    out = tmp_path / "run"
    trainer = Trainer(toy_recipe(out, "train.micro_batch=512"), ParallelMesh.build(Layout()), toy_task())
    with pytest.raises(LoomError, match="fewer than one global batch"):
        trainer.fit()
    assert not out.exists()
