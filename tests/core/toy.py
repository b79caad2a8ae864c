"""A small regression task for trainer and Booster tests: an MLP with dropout on fixed data."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from core.config import Recipe, load_recipe
from core.trainer import TrainTask


class MLP(nn.Module):
    def __init__(self, width: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(width, 4))

    def forward(self, x):
        return self.net(x)


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def toy_data(n: int = 256, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 4, generator=g)
    return TensorDataset(x, torch.tanh(x @ w) + 0.05 * torch.randn(n, 4, generator=g))


def toy_task(width: int = 32, dropout: float = 0.2, seed: int = 0, **kw) -> TrainTask:
    torch.manual_seed(seed)
    kw.setdefault("loss_fn", mse)
    return TrainTask(model=MLP(width, dropout), train_data=toy_data(), eval_data=toy_data(64, seed=2), **kw)


def toy_recipe(out_dir, *overrides: str) -> Recipe:
    base = [f"output.dir={out_dir}", "train.progress=false", "train.log_every=1",
            "train.micro_batch=8", "optim.lr=0.01", "train.warmup_steps=2", "parallel.device=cpu"]
    return load_recipe(Recipe, None, base + list(overrides))


class StopAt:
    """A loss function that raises KeyboardInterrupt at its n-th call (a run killed mid-step)."""

    def __init__(self, calls: int) -> None:
        self.calls, self.left = calls, calls

    def __call__(self, model, batch):
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return mse(model, batch)


def run_result(trainer) -> dict:
    """What a finished run ended with, whatever the plugin: step losses, full-precision weights by
    name (the chunked plugin's master weights, or the model's), and chunk evictions (0 without
    chunks)."""
    plugin = trainer.plugin
    if plugin.chunked:
        weights, moved = plugin.optimizer.master_state(), plugin.manager.stats.evictions
    else:
        weights, moved = {k: v.detach().clone() for k, v in trainer.model.unwrap().named_parameters()}, 0
    return {"losses": dict(trainer.step_losses), "weights": weights, "evictions": moved}
