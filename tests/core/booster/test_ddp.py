"""Data parallelism: 2 DDP ranks train exactly like one process with the same global batch."""

import torch

from core.distributed import Layout, ParallelMesh
from core.distributed.testing import run_distributed
from core.trainer import Trainer
from tests.core.toy import toy_recipe, toy_task

STEPS = 5


def _train(out_dir, dp: int, micro: int, accum: int):
    mesh = ParallelMesh.build(Layout(dp=dp))
    cfg = toy_recipe(out_dir, f"train.steps={STEPS}", f"train.micro_batch={micro}",
                     f"train.grad_accum={accum}", "train.eval_every=5")
    trainer = Trainer(cfg, mesh, toy_task(dropout=0.0))
    trainer.fit()
    n_params = sum(p.numel() for p in trainer.model.unwrap().parameters())
    return {"losses": trainer.step_losses, "eval": trainer.eval_losses,
            "weights": {k: v.clone() for k, v in trainer.model.unwrap().state_dict().items()},
            "counts": mesh.stats.as_dict(), "n_params": n_params}


def _ddp_runs(out_dir):
    return {"plain": _train(f"{out_dir}/plain", dp=2, micro=4, accum=1),
            "accum": _train(f"{out_dir}/accum", dp=2, micro=2, accum=2)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_ddp_two_ranks_match_one_process(tmp_path):
    serial = _train(tmp_path / "serial", dp=1, micro=8, accum=1)
    ranks = run_distributed(_ddp_runs, world_size=2, args=(str(tmp_path),))
    for run in ("plain", "accum"):
        for rank in ranks:
            got = rank[run]
            for step in range(1, STEPS + 1):
                assert abs(got["losses"][step] - serial["losses"][step]) <= 1e-6 * abs(serial["losses"][step])
            assert abs(got["eval"][5] - serial["eval"][5]) <= 1e-6 * abs(serial["eval"][5])
            for k, w in serial["weights"].items():
                assert _rel(got["weights"][k], w) <= 1e-6, (run, k)
        # the two replicas hold bitwise the same weights
        assert all(torch.equal(ranks[0][run]["weights"][k], ranks[1][run]["weights"][k])
                   for k in serial["weights"])


def test_ddp_gradient_all_reduces_are_counted(tmp_path):
    ranks = run_distributed(_ddp_runs, world_size=2, args=(str(tmp_path),))
    for rank in ranks:
        n = rank["plain"]["n_params"]
        dp = rank["plain"]["counts"]["dp"]["all_reduce"]
        # every step: all gradients (fp32) through DDP's hook, plus the 1-value loss for the log
        # (log_every=1); one eval: its 1-value mean
        assert dp["bytes"] == STEPS * n * 4 + STEPS * 4 + 8
        # with accumulation, no_sync skips the first micro-batch's all-reduce: same bytes
        assert rank["accum"]["counts"]["dp"]["all_reduce"]["bytes"] == dp["bytes"]
