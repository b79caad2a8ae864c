"""A tiny diffusers UNet with gradient checkpointing (the session's `recompute`) under ZeRO-3 and
host / NVMe offload with budgets that evict during every backward trains exactly as plain PyTorch
with diffusers' own checkpointing does, fully and with LoRA adapters on a frozen UNet."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from apps.diffusion.model import add_lora
from core.booster import make_plugin
from core.config import Recipe, load_recipe
from core.distributed import Layout, ParallelMesh
from core.trainer import Trainer, TrainTask
from tests.core.toy import run_result

STEPS = 5
SMALL = ["memory.chunk_mb=0.02", "memory.device_gb=0.00008"]       # ~5 K-element chunks, room for 4
CONFIGS = {
    "zero3": ["parallel.zero=3", "memory.chunk_mb=0.02"],
    "cpu": ["parallel.offload=cpu", *SMALL],
    "nvme": ["parallel.offload=nvme", *SMALL],
}


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)


class _Denoise(torch.nn.Module):
    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, context).sample


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(32, 4, 8, 8, generator=g), torch.randint(0, 1000, (32,), generator=g),
                         torch.randn(32, 6, 16, generator=g), torch.randn(32, 4, 8, 8, generator=g))


def _loss(model, batch):
    x, t, context, target = batch
    return F.mse_loss(model(x, t, context), target)


def _train(out_dir, overrides: list[str], lora: bool) -> dict:
    mesh = ParallelMesh.build(Layout())
    cfg = load_recipe(Recipe, None, [
        f"output.dir={out_dir}", "output.overwrite=true", "train.progress=false", "train.log_every=1",
        f"train.steps={STEPS}", "train.micro_batch=4", "train.eval_every=0", "train.warmup_steps=0",
        "train.grad_clip=1.0", "optim.lr=0.003", "optim.weight_decay=0.0", "parallel.device=cpu",
        f"memory.nvme_dir={out_dir}/nvme", *overrides])
    plugin = make_plugin(cfg, mesh)
    torch.manual_seed(0)
    unet = _unet()
    if lora:
        add_lora(unet, rank=2, alpha=2.0)
    unet.enable_gradient_checkpointing(plugin.recompute)
    trainer = Trainer(cfg, mesh, TrainTask(model=_Denoise(unet), loss_fn=_loss, train_data=_data()), plugin)
    trainer.fit()
    return run_result(trainer)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_checkpointed_unet_under_chunks_trains_like_plain_pytorch(tmp_path, lora):
    plain = _train(tmp_path / "plain", [], lora)
    # LoRA (frozen weights read by checkpointed blocks) under the tightest of them
    for name, overrides in (CONFIGS.items() if not lora else [("nvme", CONFIGS["nvme"])]):
        run = _train(tmp_path / name, overrides, lora)
        for step in range(1, STEPS + 1):
            assert run["losses"][step] == pytest.approx(plain["losses"][step], rel=1e-5), (name, step)
        for k, w in plain["weights"].items():
            rel = float(torch.linalg.norm(run["weights"][k] - w) / max(float(torch.linalg.norm(w)), 1e-12))
            assert rel <= 1e-5, (name, k, rel)
        if name != "zero3":
            assert run["evictions"] > 10 * STEPS, (name, run["evictions"])
