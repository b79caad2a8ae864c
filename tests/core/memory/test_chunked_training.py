"""Training through the gemini plugin: exact resume, checkpoints a plain model loads, fp16 loss
scaling, and a disk that fails mid-run."""

import pytest
import torch
from safetensors.torch import load_file

from core.checkpoint import find_checkpoints
from core.checkpoint.stream import state_specs, write_parts
from core.distributed import Layout, ParallelMesh
from core.errors import LoomError
from core.memory.store import NVMeStore
from core.trainer import Trainer
from tests.core.toy import MLP, StopAt, mse, toy_recipe, toy_task

# 3 chunks of 4 KiB, room for 2 on the "device"
OFFLOAD = ("parallel.offload=nvme", "memory.chunk_mb=0.004", "memory.device_gb=0.00001")


def _fit(cfg, task=None):
    trainer = Trainer(cfg, ParallelMesh.build(Layout()), task or toy_task())
    return trainer, trainer.fit()


def test_resume_is_bitwise_and_the_checkpoint_loads_into_a_plain_model(tmp_path):
    common = ("train.steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=3", *OFFLOAD)
    unbroken, _ = _fit(toy_recipe(tmp_path / "a", *common))
    assert unbroken.plugin.manager.stats.evictions > 0
    stopped = Trainer(toy_recipe(tmp_path / "b", *common), ParallelMesh.build(Layout()),
                      toy_task(loss_fn=StopAt(4)))
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    resumed, _ = _fit(toy_recipe(tmp_path / "b", *common, "train.resume=latest"))
    assert all(resumed.step_losses[s] == unbroken.step_losses[s] for s in range(4, 7))
    a, b = unbroken.plugin.optimizer.master_state(), resumed.plugin.optimizer.master_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the saved weights are full-precision tensors by name: a plain model takes them as they are
    saved = load_file(str(find_checkpoints(tmp_path / "a" / "checkpoints")[-1][1] / "model.safetensors"))
    plain = MLP(dropout=0.0)
    plain.load_state_dict(saved)
    assert all(torch.equal(plain.state_dict()[k], a[k]) for k in a)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path):
    calls = {"n": 0}

    def overflow_at_step_3(model, batch):
        calls["n"] += 1
        loss = mse(model, batch)
        return loss * 1e30 if calls["n"] == 3 else loss   # inf once scaled by 2^16 in fp16 terms

    trainer, summary = _fit(toy_recipe(tmp_path, "train.steps=5", "parallel.precision=fp16", *OFFLOAD),
                            toy_task(dropout=0.0, loss_fn=overflow_at_step_3))
    opt = trainer.plugin.optimizer
    assert opt.skipped_steps == 1 and opt.step_count == 4
    assert opt.scaler.scale == 2.0 ** 15
    assert all(torch.isfinite(w).all() for w in opt.master_state().values())


def test_a_disk_failing_mid_run_ends_with_one_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real_io = NVMeStore._io
    writes = {"n": 0}

    def failing_io(self, write, kind, index, tensor):
        if write and kind == "exp_avg":
            writes["n"] += 1
            if writes["n"] > 12:             # after the checkpoint at step 2 (3 chunks per step)
                raise LoomError(f"memory.nvme_dir {self.folder}: the disk is full")
        return real_io(self, write, kind, index, tensor)

    monkeypatch.setattr(NVMeStore, "_io", failing_io)
    with pytest.raises(LoomError, match="the disk is full"):
        _fit(toy_recipe(tmp_path, "train.steps=6", "train.checkpoint_every=2", *OFFLOAD))
    assert [s for s, _ in find_checkpoints(tmp_path / "checkpoints")] == [2]
    monkeypatch.setattr(NVMeStore, "_io", real_io)
    resumed, summary = _fit(toy_recipe(tmp_path, "train.steps=6", "train.resume=latest", *OFFLOAD))
    assert summary["step"] == 6 and sorted(resumed.step_losses) == [3, 4, 5, 6]


def _frozen_head_task():
    task = toy_task(dropout=0.0)
    task.model.net[0].requires_grad_(False)       # the first layers frozen: a fine-tune of the rest
    task.model.net[3].requires_grad_(False)
    return task


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_frozen_parameters_keep_only_their_weights(tmp_path, offload):
    common = ("train.steps=4", "train.checkpoint_every=4")
    plain, _ = _fit(toy_recipe(tmp_path / "plain", *common), _frozen_head_task())
    chunked, _ = _fit(toy_recipe(tmp_path / offload, *common, f"parallel.offload={offload}", "memory.chunk_mb=0.004",
                                 "memory.device_gb=0.00001"), _frozen_head_task())
    assert all(chunked.step_losses[s] == pytest.approx(plain.step_losses[s], rel=1e-6) for s in range(1, 5))
    weights = chunked.plugin.optimizer.master_state()
    for name, p in plain.model.unwrap().named_parameters():
        assert torch.allclose(weights[name], p.detach(), rtol=1e-5, atol=1e-7), name
    manager = chunked.plugin.manager
    frozen = [c.index for c in manager.chunks if not c.trained]
    assert frozen and all(not info.param.requires_grad for i in frozen for info in manager.chunks[i].tensors)
    states = chunked.plugin.optimizer.states
    for kind in ("exp_avg", "exp_avg_sq", "grad"):      # no moments, no gradient space for frozen chunks
        if offload == "nvme":
            assert all(states._keep[kind][i] == 0 for i in frozen), kind
        else:
            assert not any((kind, i) in states._slots for i in frozen), kind
    # their weights are saved and load back (a plain model takes the checkpoint as it is)
    saved = load_file(str(find_checkpoints(tmp_path / offload / "checkpoints")[-1][1] / "model.safetensors"))
    assert all(torch.equal(saved[k], weights[k]) for k in weights)
    # an export gathers them a chunk at a time: no part larger than a chunk, together every weight
    model = chunked.model.unwrap()
    parts = list(chunked.plugin.weights(model))
    assert len(parts) == len(manager.chunks) > 2
    largest = max(c.capacity for c in manager.chunks) * 4
    assert all(0 < sum(t.numel() * t.element_size() for t in part.values()) <= largest for part in parts)
    streamed = {k: v.clone() for part in chunked.plugin.weights(model) for k, v in part.items()}
    assert streamed.keys() == weights.keys() and all(torch.equal(streamed[k], weights[k]) for k in weights)
    trained = {k for part in chunked.plugin.weights(model, trained_only=True) for k in part}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    write_parts(tmp_path / "export.safetensors", state_specs(model), chunked.plugin.weights(model))
    exported = load_file(str(tmp_path / "export.safetensors"))
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)
    # the plain plugin's weights are its parameters, in one part
    (whole,) = list(plain.plugin.weights(plain.model.unwrap()))
    assert all(torch.equal(whole[n], p) for n, p in plain.model.unwrap().named_parameters())


def _ema_run(out_dir, *overrides):
    cfg = toy_recipe(out_dir, "train.steps=4", "train.checkpoint_every=4", *overrides)
    mesh = ParallelMesh.build(Layout())
    from core.booster import make_plugin

    plugin = make_plugin(cfg, mesh)
    task = toy_task(dropout=0.0)
    ema = plugin.average(task.model, 0.9)
    task.on_step, task.extra_state = (lambda trainer: ema.update()), {"ema": ema}
    trainer = Trainer(cfg, mesh, task, plugin)
    trainer.fit()
    return trainer, ema


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_an_average_of_chunked_weights_equals_the_plain_one(tmp_path, offload):
    plain, plain_ema = _ema_run(tmp_path / "plain")
    chunked, ema = _ema_run(tmp_path / offload, f"parallel.offload={offload}", "memory.chunk_mb=0.004",
                            "memory.device_gb=0.00001")
    assert type(ema).__name__ == "ChunkEMA"          # kept with the optimizer states, not beside the model
    if offload == "nvme":
        assert "ema" in chunked.plugin.optimizer.states.slot_bytes
    averaged = ema.state_dict()
    assert averaged["updates"] == plain_ema.updates == 4
    for name, value in plain_ema.shadow.items():
        assert torch.allclose(averaged["shadow"][name], value, rtol=1e-5, atol=1e-7), name
    trained = chunked.plugin.optimizer.master_state()
    x = torch.randn(16, 8)
    model = chunked.model.unwrap()
    with torch.no_grad():
        with ema.swapped_in():                 # the model computes with the averages ...
            inside = model(x)
            plain.model.unwrap().load_state_dict(plain_ema.shadow)
            assert torch.allclose(inside, plain.model.unwrap()(x), rtol=1e-5, atol=1e-6)
    after = chunked.plugin.optimizer.master_state()  # ... and the trained weights are back after
    assert all(torch.equal(after[k], trained[k]) for k in trained)
    # the checkpoint's average is saved by name: a plain EMA takes it, and so does a resumed run
    resumed, resumed_ema = _ema_run(tmp_path / offload, f"parallel.offload={offload}", "memory.chunk_mb=0.004",
                                    "memory.device_gb=0.00001", "train.resume=latest", "train.steps=4")
    again = resumed_ema.state_dict()
    assert all(torch.equal(again["shadow"][k], averaged["shadow"][k]) for k in averaged["shadow"])
    ema.use_average()                          # the end of training: the averages become the weights
    final = chunked.plugin.optimizer.master_state()
    assert all(torch.equal(final[k], averaged["shadow"][k]) for k in averaged["shadow"])


def test_work_between_steps_is_traced_apart_and_its_passes_prefetch(tmp_path):
    """Validation or sampling between steps: its chunk uses do not enter the training trace (which
    predicts the next step's order), and each forward of the repeated module predicts the next."""
    # a budget of the two larger chunks, not the third: every pass fetches
    tight = [o for o in OFFLOAD if not o.startswith("memory.device_gb")] + ["memory.device_gb=0.0000085"]
    trainer, _ = _fit(toy_recipe(tmp_path, "train.steps=2", *tight), toy_task(dropout=0.0))
    manager, model = trainer.plugin.manager, trainer.model.unwrap()
    assert sum(c.nbytes for c in manager.chunks) > 0.0000085 * 2**30
    trace = list(manager.tracer.previous)
    assert manager.tracer.current == []         # the evaluation after the last step was traced apart
    x = torch.randn(4, 8)

    def passes(**kw):
        hits = manager.stats.prefetch_hits
        with torch.no_grad(), trainer.plugin.between_steps(**kw):
            outs = [model(x) for _ in range(3)]
        assert manager.tracer.previous == trace and manager.tracer.current == []   # the step's trace untouched
        return manager.stats.prefetch_hits - hits, outs

    unpredicted, a = passes()
    predicted, b = passes(passes=model)
    assert unpredicted == 0 and predicted >= 2          # passes 2 and 3 fetched ahead from pass 1's trace
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with torch.no_grad():
        assert torch.equal(model(x), a[0])
