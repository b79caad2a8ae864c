"""A fourth app, as README's "Adding an app" shows it: an MLP classifier on generated data.

Its recipe, its model, its data, a TrainTask and one session call: the same code trains in one
process, with data parallelism, with ZeRO-3 and NVMe offload, and with 1D tensor parallelism,
as the recipe's `parallel` section says.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from core.config import Recipe, load_recipe, opt, section
from core.session import session
from core.tensor import COLUMN, ROW, Linear
from core.trainer import TrainTask


@dataclass
class ClassifierConfig:
    features: int = opt(16, "input features")
    width: int = opt(64, "hidden width")
    classes: int = opt(4, "classes")
    samples: int = opt(512, "generated training samples")


@dataclass
class ClassifierRecipe(Recipe):
    model: ClassifierConfig = section(ClassifierConfig, "the classifier and its data")


class MLP(nn.Module):
    """Written once on core.tensor's layers: `tensor` splits them (or not, on one rank)."""

    def __init__(self, cfg: ClassifierConfig, tensor) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.features, cfg.width, tensor, role=COLUMN)
        self.fc2 = Linear(cfg.width, cfg.classes, tensor, role=ROW)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def generated_data(cfg: ClassifierConfig, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(cfg.samples, cfg.features, generator=g)
    teacher = torch.randn(cfg.features, cfg.classes, generator=g)
    return TensorDataset(x, (x @ teacher).argmax(dim=1))


def train(cfg: ClassifierRecipe) -> dict:
    with session(cfg) as s:
        torch.manual_seed(cfg.train.seed)
        model = s.build(lambda par: MLP(cfg.model, par.tensor))
        task = TrainTask(model=model, train_data=generated_data(cfg.model),
                         loss_fn=lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]))
        return s.fit(task)


def main(overrides: list[str]) -> dict:
    return train(load_recipe(ClassifierRecipe, None, overrides))
