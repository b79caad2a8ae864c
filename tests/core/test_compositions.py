"""Every pair of features either trains or is refused by a rule the README states.

The features are the recipe's parallel axes (each alone: pipeline with 1F1B or interleaved,
tensor parallelism 1D or 2D, sequence parallelism with ring or all-to-all attention), ZeRO stages,
host / NVMe offload and a device budget, bf16 and fp16, activation checkpointing, chunks stepped
inside backward and LAMB. Each feature alone and each pair of features from different groups runs
one training step of a tiny GPT through the session and the trainer on 2 gloo ranks (4 where two
model axes or 2D tensor parallelism need them; data parallelism takes the ranks the model axes
leave), or is refused before any process group is joined with a message that one of the README's
rules names (`RULES`). A pair whose layout needs more than 4 processes (2D tensor parallelism with a
pipeline or sequence split) is refused by the layout rule; such layouts run on 8 ranks in the
pipeline and tensor-parallel tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from apps.gpt.config import GPTModelConfig, GPTRecipe
from apps.gpt.model import GPT, next_token_loss
from core.booster import make_plugin
from core.config import load_recipe
from core.distributed import ParallelMesh
from core.distributed.testing import run_distributed
from core.errors import LoomError
from core.layout import check_layout
from core.session import Session
from core.trainer import TrainTask

MODEL = GPTModelConfig(n_layer=4, n_head=4, d_model=32, seq_len=8, vocab_size=64, bias=False)
BUDGET = ["memory.chunk_mb=0.016"]          # several chunks per stage
FEATURES = {      # name: (group, overrides); two features of one group set the same keys
    "pp_1f1b": ("pp", ["parallel.pp=2"]),
    "pp_interleaved": ("pp", ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.virtual_stages=2",
                              "parallel.microbatches=4"]),
    "tp_1d": ("tp", ["parallel.tp=2"]),
    "tp_2d": ("tp", ["parallel.tp=4", "parallel.tp_mode=2d"]),
    "sp_ring": ("sp", ["parallel.sp=2"]),
    "sp_all_to_all": ("sp", ["parallel.sp=2", "parallel.sp_mode=all_to_all"]),
    "zero1": ("zero", ["parallel.zero=1"]),
    "zero2": ("zero", ["parallel.zero=2"]),
    "zero3": ("zero", ["parallel.zero=3"]),
    "offload_cpu": ("offload", ["parallel.offload=cpu", *BUDGET]),
    "offload_nvme": ("offload", ["parallel.offload=nvme", *BUDGET]),
    "device_budget": ("offload", ["memory.device_gb=0.00008", *BUDGET]),
    "bf16": ("precision", ["parallel.precision=bf16"]),
    "fp16": ("precision", ["parallel.precision=fp16"]),
    "checkpointing": ("checkpointing", ["model.gradient_checkpointing=true"]),
    "step_in_backward": ("step_in_backward", ["memory.step_in_backward=true", "train.grad_clip=0"]),
    "lamb": ("optimizer", ["optim.name=lamb"]),
}
# Each refusal names one of these rules: (a phrase of the message, the rule as the README states it).
RULES = {
    "layout": ("= {n} does not divide the world size", "a layout whose model axes do not divide the number "
               "of processes"),
    "step_in_backward_alone": ("memory.step_in_backward=true needs the chunked engine",
                               "`memory.step_in_backward=true` needs the chunked engine"),
    "step_in_backward_fp16": ("rules out parallel.precision=fp16",
                              "rules out fp16, gradient clipping and accumulation"),
    "step_in_backward_pipeline": ("a pipeline step (parallel.pp > 1) adds the gradients of several micro-batches",
                                  "and pipeline parallelism (whose steps accumulate micro-batches)"),
    "norms_before_step": ("needs every parameter's norm before any step",
                          "`optim.name=lamb|lars` with `parallel.offload=nvme` or `memory.step_in_backward`"),
}


def _cases() -> list[tuple[str, ...]]:
    names = list(FEATURES)
    pairs = [(a, b) for a, b in itertools.combinations(names, 2) if FEATURES[a][0] != FEATURES[b][0]]
    return [(n,) for n in names] + pairs


def _recipe(root: str, case: tuple[str, ...]) -> GPTRecipe:
    overrides = [o for name in case for o in FEATURES[name][1]]
    micro = 4 if any(FEATURES[n][0] == "pp" for n in case) else 2
    return load_recipe(GPTRecipe, None, [
        f"output.dir={root}/{'+'.join(case)}", "output.overwrite=true", "train.progress=false", "train.steps=1",
        f"train.micro_batch={micro}", "train.eval_every=0", "optim.lr=0.01", "parallel.device=cpu",
        f"memory.nvme_dir={root}/nvme/{'+'.join(case)}", *overrides])


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, MODEL.vocab_size, (64, MODEL.seq_len + 1), generator=g))


def _world(case: tuple[str, ...]) -> int:
    """2 ranks, or 4 where the model axes need them (data parallelism takes what they leave)."""
    sizes = {"pp": 2, "sp": 2, "tp": 2}
    need = math.prod(sizes[FEATURES[n][0]] for n in case if FEATURES[n][0] in sizes)
    return 4 if need > 2 or "tp_2d" in case else 2


def _step(cfg: GPTRecipe, meshes: dict) -> float:
    layout, batch = check_layout(cfg, torch.distributed.get_world_size())
    mesh = meshes.get(layout) or meshes.setdefault(layout, ParallelMesh.build(layout))
    plugin = make_plugin(cfg, mesh)
    try:
        s = Session(cfg, None, mesh, plugin, batch)
        torch.manual_seed(0)
        model_cfg = dataclasses.replace(MODEL, gradient_checkpointing=cfg.model.gradient_checkpointing)
        model = s.build(lambda par: GPT(model_cfg, par.tensor, par.sequence, par.recompute))
        task = TrainTask(model=model, loss_fn=lambda runner, b: next_token_loss(runner, b[0], model),
                         train_data=_data(), pipeline_input=lambda b: b[0][:, :-1],
                         pipeline_loss=lambda logits, b: model.loss(logits, b[0][:, 1:]))
        return float(s.fit(task)["loss"])
    finally:
        plugin.close()


def _all(root: str) -> dict:
    import core.trainer

    # beside the point here, and most of a tiny step's time on 2 cores: the loss plot (0.8 s) and
    # the checkpoint (0.7 s; those of these layouts are tested by the parity tests of each)
    core.trainer.plot_loss_curve = lambda *a, **k: None
    core.trainer.Trainer.save_checkpoint = lambda self: None
    meshes: dict = {}
    out = {}
    world = torch.distributed.get_world_size()
    for case in [c for c in _cases() if _world(c) == world]:
        try:
            cfg = _recipe(root, case)
            out[case] = ("ran", _step(cfg, meshes))
        except LoomError as e:
            out[case] = ("refused", str(e))
    return out


def test_every_pair_of_features_trains_or_is_refused_by_a_stated_rule(tmp_path):
    readme = " ".join(Path(__file__).resolve().parents[2].joinpath("README.md").read_text().split())
    for phrase, stated in RULES.values():
        assert stated in readme, stated
    got = {**run_distributed(_all, world_size=2, args=(str(tmp_path),), timeout=900)[0],
           **run_distributed(_all, world_size=4, args=(str(tmp_path),), timeout=900)[0]}
    assert set(got) == set(_cases())
    for case, (what, value) in got.items():
        assert what == "refused" or math.isfinite(value), case
    # each refusal names a stated rule, and each rule refuses something (none is stale)
    patterns = {name: re.compile(re.escape(phrase).replace(re.escape("{n}"), r"\d+"))
                for name, (phrase, _) in RULES.items()}
    named = {case: [name for name, p in patterns.items() if p.search(value)]
             for case, (what, value) in got.items() if what == "refused"}
    assert not [case for case, names in named.items() if not names], \
        {case: got[case][1] for case, names in named.items() if not names}
    assert {name for names in named.values() for name in names} == set(RULES)
    # what is refused, and nothing else: the step-in-backward rules, LAMB's norms, 2D tp beside pp / sp
    expected = {c for c in _cases() if _expected_refusal(c)}
    assert set(named) == expected, sorted(set(named) ^ expected)


def _expected_refusal(case: tuple[str, ...]) -> bool:
    groups = {FEATURES[n][0] for n in case}
    chunked = bool(groups & {"zero", "offload"})
    if "tp_2d" in case and groups & {"pp", "sp"}:
        return True                                   # 8 processes
    if "step_in_backward" in case:
        return not chunked or "fp16" in case or "pp" in groups or "lamb" in case
    if "lamb" in case and "offload_nvme" in case:
        return True
    return False
