"""The training loop: exact resume, accumulation, schedules, outputs, and its failures."""

import errno
import json
import os
import subprocess

import pytest
import torch

from core.checkpoint import find_checkpoints
from core.distributed import Layout, ParallelMesh
from core.errors import LoomError
from core.optim import LRShape
from core.trainer import Trainer
from tests.core.toy import StopAt, mse, toy_recipe, toy_task


def _fit(cfg, task=None, **task_kw):
    trainer = Trainer(cfg, ParallelMesh.build(Layout()), task or toy_task(**task_kw))
    return trainer, trainer.fit()


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.model.unwrap().state_dict().items()}


def test_resume_after_a_stop_is_bitwise_identical(tmp_path):
    common = ("train.steps=8", "train.checkpoint_every=3", "train.eval_every=4", "train.grad_accum=2",
              "train.keep_checkpoints=5")
    unbroken, _ = _fit(toy_recipe(tmp_path / "a", *common))

    # The same run, killed during step 5 (2 micro-batches a step): the checkpoint at step 3 is
    # what it leaves behind.
    stopped = Trainer(toy_recipe(tmp_path / "b", *common), ParallelMesh.build(Layout()),
                      toy_task(loss_fn=StopAt(2 * 4 + 1)))
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    assert [s for s, _ in find_checkpoints(tmp_path / "b" / "checkpoints")] == [3]

    torch.manual_seed(12345)  # whatever the process did in between must not matter
    resumed, summary = _fit(toy_recipe(tmp_path / "b", *common, "train.resume=latest"))
    assert summary["step"] == 8
    assert sorted(resumed.step_losses) == [4, 5, 6, 7, 8]

    for step in range(1, 9):
        before = stopped.step_losses if step <= 3 else resumed.step_losses
        assert before[step] == unbroken.step_losses[step], step       # bitwise
    assert resumed.eval_losses[8] == unbroken.eval_losses[8]
    a, b = _weights(unbroken), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # rows after step 3 replaced
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000


def test_gradient_accumulation_equals_a_bigger_micro_batch(tmp_path):
    runs = []
    for i, (micro, accum) in enumerate([(8, 1), (4, 2), (2, 4)]):
        trainer, _ = _fit(toy_recipe(tmp_path / str(i), "train.steps=5", f"train.micro_batch={micro}",
                                     f"train.grad_accum={accum}"), dropout=0.0)
        runs.append(trainer)
    for other in runs[1:]:
        for s in range(1, 6):
            assert other.step_losses[s] == pytest.approx(runs[0].step_losses[s], rel=1e-6)
        a, b = _weights(runs[0]), _weights(other)
        for k in a:
            assert torch.linalg.norm(a[k] - b[k]) <= 1e-6 * torch.linalg.norm(a[k]), k


def test_global_batch_sets_accumulation(tmp_path):
    trainer, _ = _fit(toy_recipe(tmp_path, "train.steps=1", "train.micro_batch=4", "train.global_batch=16"))
    assert (trainer.batch.micro_batch, trainer.batch.grad_accum, trainer.batch.global_batch) == (4, 4, 16)
    with pytest.raises(LoomError, match="train.global_batch: got 10; allowed: a multiple of"):
        _fit(toy_recipe(tmp_path / "x", "train.steps=1", "train.micro_batch=4", "train.global_batch=10"))


def test_lr_schedule_shapes():
    cos = LRShape(total=110, warmup=10, kind="cosine", min_ratio=0.1)
    assert cos(0) == pytest.approx(1 / 11) and cos(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    lin = LRShape(total=100, warmup=0, kind="linear", min_ratio=0.0)
    assert lin(50) == pytest.approx(0.5)
    assert LRShape(total=100, warmup=5, kind="constant")(50) == 1.0


def test_outputs_and_a_fresh_run_does_not_clobber_an_old_one(tmp_path):
    trainer, summary = _fit(toy_recipe(tmp_path, "train.steps=4", "train.eval_every=2"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert all({"loss", "lr", "samples_per_s", "grad_norm"} <= set(r) for r in rows if "loss" in r)
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "loss.png").is_file()
    assert summary["checkpoint"].endswith("step_0000004")
    with pytest.raises(LoomError, match="already holds checkpoints .*train.resume=latest.*output.overwrite=true"):
        _fit(toy_recipe(tmp_path, "train.steps=4"))
    _, again = _fit(toy_recipe(tmp_path, "train.steps=2", "output.overwrite=true"))
    assert [s for s, _ in find_checkpoints(tmp_path / "checkpoints")] == [2]


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    _fit(toy_recipe(tmp_path, "train.steps=6", "train.checkpoint_every=1", "train.keep_checkpoints=2"))
    assert [s for s, _ in find_checkpoints(tmp_path / "checkpoints")] == [5, 6]


def test_resume_from_something_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(LoomError, match="is not a Loom checkpoint folder"):
        _fit(toy_recipe(tmp_path, "train.steps=2", f"train.resume={tmp_path / 'nothing'}"))


def test_a_loss_that_becomes_nan_stops_with_advice(tmp_path):
    def nan_loss(model, batch):
        return mse(model, batch) * float("nan")
    with pytest.raises(LoomError, match="the loss became nan at step 1; lower optim.lr"):
        _fit(toy_recipe(tmp_path, "train.steps=3"), toy_task(loss_fn=nan_loss))


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save

    def save(obj, f, *a, **k):
        name = str(getattr(f, "name", f))         # a path, or the file object it was opened as
        if "step_0000004" in name and name.endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", name)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(LoomError, match="the disk is full while writing checkpoint .*step_0000004"):
        _fit(toy_recipe(tmp_path, "train.steps=4", "train.checkpoint_every=2"))
    ckpts = tmp_path / "checkpoints"
    assert [s for s, _ in find_checkpoints(ckpts)] == [2]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]  # no partial folder left
    monkeypatch.setattr(torch, "save", real_save)
    resumed, summary = _fit(toy_recipe(tmp_path, "train.steps=4", "train.resume=latest"))
    assert summary["step"] == 4 and sorted(resumed.step_losses) == [3, 4]


def _can_mount_tmpfs(path) -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_a_real_full_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        # ~0.8 MB per checkpoint (weights + two Adam moments): the first fits in 1 MiB, the second not.
        with pytest.raises(LoomError, match="the disk is full while writing checkpoint"):
            _fit(toy_recipe(disk, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3"),
                 width=250)
        assert [s for s, _ in find_checkpoints(disk / "checkpoints")] == [2]
        assert not any(p.name.startswith(".") for p in (disk / "checkpoints").iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_exactly(tmp_path, precision):
    common = ("train.steps=6", "train.checkpoint_every=3", f"parallel.precision={precision}",
              "train.keep_checkpoints=3")
    unbroken, summary = _fit(toy_recipe(tmp_path / "a", *common))
    assert unbroken.step_losses[6] < unbroken.step_losses[1]
    if precision == "fp16":
        assert unbroken.optimizer.scaler is not None and unbroken.optimizer.scaler.get_scale() > 0
    # stop after the checkpoint at step 3, then continue: the scaler comes back with the rest
    stopped = Trainer(toy_recipe(tmp_path / "b", *common), ParallelMesh.build(Layout()),
                      toy_task(loss_fn=StopAt(4)))
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    resumed, _ = _fit(toy_recipe(tmp_path / "b", *common, "train.resume=latest"))
    assert all(resumed.step_losses[s] == unbroken.step_losses[s] for s in range(4, 7))
    if precision == "fp16":
        assert resumed.optimizer.scaler.get_scale() == unbroken.optimizer.scaler.get_scale()
