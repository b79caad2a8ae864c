"""Activation checkpointing with chunked parameters (`core.memory.recompute`) trains a tiny GPT
exactly as plain PyTorch with torch's checkpoint does: ZeRO-3, host and NVMe offload under budgets
that evict chunks during every backward, with dropout (the recomputation draws the same masks),
over 5 steps; and torch's own checkpoint under chunks is refused with what to use instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.utils.data import TensorDataset

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from core.booster import make_plugin
from core.config import Recipe, load_recipe
from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.errors import LoomError
from core.trainer import Trainer, TrainTask
from tests.core.memory.test_gpt_memory_parity import _data, _loss   # same shapes as MODEL
from tests.core.toy import run_result

STEPS = 5
MODEL = GPTModelConfig(n_layer=3, n_head=2, d_model=32, seq_len=16, vocab_size=64, bias=False, dropout=0.1,
                       gradient_checkpointing=True)
# chunks of ~4 K fp32 elements (a block is ~12 K), a budget of three: every backward evicts
SMALL = ["memory.chunk_mb=0.016", "memory.device_gb=0.0000458"]
CONFIGS = {
    "zero3": ["parallel.zero=3", "memory.chunk_mb=0.016"],
    "cpu": ["parallel.offload=cpu", *SMALL],
    "nvme": ["parallel.offload=nvme", *SMALL],
}


def _train(out_dir, overrides: list[str], dp: int = 1, model: GPTModelConfig = MODEL) -> dict:
    mesh = ParallelMesh.build(Layout(dp=dp))
    cfg = load_recipe(Recipe, None, [
        f"output.dir={out_dir}", "output.overwrite=true", "train.progress=false", "train.log_every=1",
        f"train.steps={STEPS}", f"train.micro_batch={8 // dp}", "train.eval_every=0", "train.warmup_steps=2",
        "train.grad_clip=0.5", "optim.lr=0.01", "parallel.device=cpu", f"memory.nvme_dir={out_dir}/nvme",
        *overrides])
    plugin = make_plugin(cfg, mesh)
    torch.manual_seed(0)
    trainer = Trainer(cfg, mesh, TrainTask(model=GPT(model, recompute=plugin.recompute), loss_fn=_loss,
                                           train_data=_data()), plugin)
    trainer.fit()
    return run_result(trainer)


def _all(out_dir, dp, model=MODEL):
    return {name: _train(f"{out_dir}/{name}", ov, dp, model) for name, ov in CONFIGS.items()}


def _check(run: dict, ref: dict, what: str) -> None:
    for step in range(1, STEPS + 1):
        assert run["losses"][step] == pytest.approx(ref["losses"][step], rel=1e-5), (what, step)
    for k, w in ref["weights"].items():
        rel = float(torch.linalg.norm(run["weights"][k] - w) / torch.linalg.norm(w))
        assert rel <= 1e-5, (what, k, rel)


def test_checkpointed_blocks_under_chunks_train_like_plain_pytorch_with_checkpointing(tmp_path):
    plain = _train(tmp_path / "plain", [])
    # checkpointing changes no number: the recomputation replays the first forward's dropout
    unchecked = _train(tmp_path / "unchecked", [], model=GPTModelConfig(**{**vars(MODEL),
                                                                          "gradient_checkpointing": False}))
    _check(unchecked, plain, "without checkpointing")
    for name, run in _all(tmp_path, 1).items():
        _check(run, plain, name)
        if name != "zero3":
            assert run["evictions"] > 10 * STEPS, (name, run["evictions"])


def test_checkpointed_blocks_under_chunks_on_two_ranks(tmp_path):
    # no dropout: two ranks draw their masks from their own streams, one process from one
    model = GPTModelConfig(**{**vars(MODEL), "dropout": 0.0})
    plain = _train(tmp_path / "plain", ["train.grad_accum=2", "train.micro_batch=4"], model=model)
    for rank in run_distributed(_all, world_size=2, args=(str(tmp_path), 2, model)):
        for name, run in rank.items():
            _check(run, plain, f"dp=2 {name}")


class _TorchCheckpointed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=False))


def test_torch_checkpoint_under_chunks_is_refused_with_what_to_use(tmp_path):
    cfg = load_recipe(Recipe, None, [f"output.dir={tmp_path}", "train.progress=false", "train.steps=1",
                                     "train.micro_batch=4", "parallel.device=cpu", "parallel.offload=cpu"])
    data = TensorDataset(torch.randn(8, 8), torch.randn(8, 4))
    task = TrainTask(model=_TorchCheckpointed(), train_data=data,
                     loss_fn=lambda model, batch: F.mse_loss(model(batch[0]), batch[1]))
    with pytest.raises(LoomError, match=r"Linear runs its forward again inside backward .*ModelParallel\.recompute"):
        Trainer(cfg, ParallelMesh.build(Layout()), task).fit()
