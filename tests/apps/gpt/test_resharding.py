"""Sharded checkpoints reshard: the GPT app saves a sharded checkpoint at step 2 under each of eight
layouts, another layout resumes it and runs steps 3-4, and the losses and the weights it ends with
are those of its own uninterrupted run (1e-5, fp32); a checkpoint whose optimizer states were
dropped does not pass, so the states are carried, not reset.

The suite resumes each layout's checkpoint in the next layout of the list (a cycle: every layout
writes once and reads once, 8 of the 56 pairs). By hand, `python -m tests.apps.gpt.test_resharding`
runs the cycle with four more layouts (EXTRA: 3D, 2.5D, four stages, ZeRO-1 with host offload), and
with `--all` every layout against every other. A change of precision is checked apart: a bf16 run
resumes a sharded checkpoint exactly as it resumes the unsplit one of the same run."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from core.checkpoint.convert import unsplit_weights
from core.distributed.testing import run_distributed

COMMON = ["data.tokenizer=bytes", "train.steps=4", "train.log_every=1", "train.eval_every=4", "train.eval_batches=2",
          "optim.lr=0.01", "train.warmup_steps=0", "model.bias=false", "train.micro_batch=2", "train.global_batch=8",
          "train.checkpoint_every=2", "train.checkpoint_format=sharded", "train.keep_checkpoints=2",
          "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.seq_len=32", "train.progress=false",
          "sample.tokens=0"]
# name: (processes, overrides)
LAYOUTS = {
    "one": (1, []),
    "dp2_zero2": (2, ["parallel.dp=2", "parallel.zero=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp4_2d": (4, ["parallel.tp=4", "parallel.tp_mode=2d"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2_pp2_tp2": (8, ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2"]),
    "dp2_zero3_nvme": (2, ["parallel.dp=2", "parallel.zero=3", "parallel.offload=nvme", "memory.chunk_mb=0.01",
                           "memory.device_gb=0.0001"]),
    "sp2": (2, ["parallel.sp=2"]),
}
# by hand only (`python -m tests.apps.gpt.test_resharding`): the other tensor-parallel modes (their
# micro-batches split q x q or d x q ways), four stages (cut by parameter count: two blocks), ZeRO-1
EXTRA = {
    "tp8_3d": (8, ["parallel.tp=8", "parallel.tp_mode=3d", "train.micro_batch=4"]),
    "tp8_2.5d": (8, ["parallel.tp=8", "parallel.tp_mode=2.5d", "parallel.tp_depth=2", "train.micro_batch=4"]),
    "pp4": (4, ["parallel.pp=4", "parallel.pp_partition=params"]),
    "dp2_zero1_cpu": (2, ["parallel.dp=2", "parallel.zero=1", "parallel.offload=cpu"]),
}


def _runs(jobs: list[list[str]]) -> None:
    """Rank-side: the GPT app's main, once per argument list, one after the other."""
    import contextlib
    import io

    from apps.gpt.pretrain import main

    for argv in jobs:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == 0, argv


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.linalg.norm(a[k] - b[k]) <= 1e-5 * torch.linalg.norm(b[k]) + 1e-8, (what, k)


def _by_size(fn):
    """fn(name) -> jobs, run for every layout, one spawn per world size."""
    sizes = sorted({n for n, _ in LAYOUTS.values()})
    return {size: [(name, fn(name)) for name, (n, _) in LAYOUTS.items() if n == size] for size in sizes}


def _pairs(full: bool) -> list[tuple[str, str]]:
    names = list(LAYOUTS)
    if full:
        return [(src, dst) for dst in names for src in names if src != dst]
    return [(src, names[(i + 1) % len(names)]) for i, src in enumerate(names)]


@pytest.mark.slow
def test_each_layout_resumes_another_layouts_sharded_checkpoint(tmp_path, text_folder, full=False):
    pairs = _pairs(full)
    env = {"LOOM_CACHE": str(tmp_path / "cache")}
    common = [f"data.path={text_folder}", *COMMON]

    def argv(name, out, *more):
        return [*common, *LAYOUTS[name][1], f"output.dir={out}", f"memory.nvme_dir={tmp_path / 'nvme' / out.name}",
                *more]

    # each layout's uninterrupted run, which writes the step-2 checkpoint the others resume
    for size, named in _by_size(lambda name: [argv(name, tmp_path / name)]).items():
        run_distributed(_runs, world_size=size, args=([job for _, jobs in named for job in jobs],), env=env,
                        timeout=600)
    whole = {name: (_losses(tmp_path / name), unsplit_weights(tmp_path / name / "checkpoints" / "step_0000004"))
             for name in LAYOUTS}
    step2 = {name: tmp_path / name / "checkpoints" / "step_0000002" for name in LAYOUTS}
    assert all((step2[n] / "sharded.json").is_file() and not (step2[n] / "model.safetensors").exists() for n in LAYOUTS)

    # the pairs: a layout resumes another layout's checkpoint
    def resumes(name):
        return [argv(name, tmp_path / f"{src}-to-{name}", f"train.resume={step2[src]}") for src, dst in pairs
                if dst == name]

    for size, named in _by_size(resumes).items():
        run_distributed(_runs, world_size=size, args=([job for _, jobs in named for job in jobs],), env=env,
                        timeout=600)
    for src, name in pairs:
        losses, weights = whole[name]
        out = tmp_path / f"{src}-to-{name}"
        got = _losses(out)
        assert sorted(got) == [3, 4], (src, name)
        assert [got[s] for s in (3, 4)] == pytest.approx([losses[s] for s in (3, 4)], rel=1e-5), (src, name)
        _close(unsplit_weights(out / "checkpoints" / "step_0000004"), weights, (src, name))

    # the data position reshards: saved at dp=4, resumed at dp=2, the next samples are the ones the
    # uninterrupted dp=2 run saw (its losses, step by step)
    run_distributed(_runs, world_size=4, args=([argv("one", tmp_path / "dp4", "parallel.dp=4")],), env=env)
    dp4 = tmp_path / "dp4" / "checkpoints" / "step_0000002"
    run_distributed(_runs, world_size=2, args=([argv("dp2_zero2", tmp_path / "dp4-to-dp2", f"train.resume={dp4}")],),
                    env=env)
    got = _losses(tmp_path / "dp4-to-dp2")
    assert [got[s] for s in (3, 4)] == pytest.approx([whole["dp2_zero2"][0][s] for s in (3, 4)], rel=1e-5)

    # the optimizer states are carried: without them, the same resume ends elsewhere
    stripped = tmp_path / "stripped"
    shutil.copytree(step2["dp2_zero2"], stripped)
    index = json.loads((stripped / "sharded.json").read_text())
    index["tensors"] = {k: v for k, v in index["tensors"].items() if not k.startswith("optim:")}
    (stripped / "sharded.json").write_text(json.dumps(index))
    (stripped / "manifest.json").unlink()
    run_distributed(_runs, world_size=2, args=([argv("tp2", tmp_path / "reset", f"train.resume={stripped}")],), env=env)
    assert _losses(tmp_path / "reset")[3] == pytest.approx(whole["tp2"][0][3], rel=1e-5)   # the weights came back
    assert _losses(tmp_path / "reset")[4] != pytest.approx(whole["tp2"][0][4], rel=1e-3)   # the moments did not


def test_a_bf16_run_resumes_a_sharded_checkpoint_as_it_resumes_the_unsplit_one(tmp_path, text_folder):
    """Precision is a layout too: one fp32 run writes both formats (the same steps twice), and a bf16
    run resumed from either goes on identically (the fp32 weights and moments it loads are the same
    numbers, whichever format held them; unsplit optimizer states resume only in the layout that
    wrote them, so the bf16 run is one process too)."""
    env = {"LOOM_CACHE": str(tmp_path / "cache")}
    common = [f"data.path={text_folder}", *COMMON]
    fmt = {"sharded": [], "unsplit": ["train.checkpoint_format=unsplit"]}
    run_distributed(_runs, world_size=1, args=([[*common, *more, f"output.dir={tmp_path / name}"]
                                                for name, more in fmt.items()],), env=env)
    bf16 = ["parallel.precision=bf16"]
    run_distributed(_runs, world_size=1, args=([[*common, *bf16, f"output.dir={tmp_path / f'bf16-{name}'}",
                                                 f"train.resume={tmp_path / name / 'checkpoints' / 'step_0000002'}"]
                                                for name in fmt],), env=env)
    assert (tmp_path / "sharded" / "checkpoints" / "step_0000002" / "sharded.json").is_file()
    assert (tmp_path / "unsplit" / "checkpoints" / "step_0000002" / "model.safetensors").is_file()
    a, b = _losses(tmp_path / "bf16-sharded"), _losses(tmp_path / "bf16-unsplit")
    assert sorted(a) == [3, 4] and a == b
    one = _losses(tmp_path / "sharded")
    assert a[3] == pytest.approx(one[3], rel=2e-2) and a[3] != one[3]      # bf16's own numbers, near fp32's
    x = unsplit_weights(tmp_path / "bf16-sharded" / "checkpoints" / "step_0000004")
    y = unsplit_weights(tmp_path / "bf16-unsplit" / "checkpoints" / "step_0000004")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


if __name__ == "__main__":      # by hand: the four EXTRA layouts too; --all: every pair of layouts
    import sys
    import tempfile

    from tests.apps.gpt.conftest import write_text_folder

    LAYOUTS.update(EXTRA)
    full = "--all" in sys.argv
    with tempfile.TemporaryDirectory() as d:
        test_each_layout_resumes_another_layouts_sharded_checkpoint(Path(d), write_text_folder(Path(d) / "text"),
                                                                    full=full)
    print(f"{len(_pairs(full))} pairs of layouts resumed each other's sharded checkpoints", file=sys.stderr)
