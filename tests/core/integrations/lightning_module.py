"""LightningModules for the strategy tests (importable, so spawned and forked ranks find them): a small
MLP classifier on generated data, which records each micro-batch's loss and writes them from each
rank at the end of training, on pytorch_lightning and on the unified lightning package; and a
transformers causal LM trained with its own loss."""

from pathlib import Path

import lightning.pytorch as unified
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class _ClassifierBody:
    def __init__(self, losses_to: str = "", lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32),
                                       torch.nn.GELU(), torch.nn.Linear(32, 4))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x).float(), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)

    def on_train_end(self) -> None:
        if self.hparams.losses_to:
            Path(f"{self.hparams.losses_to}.rank{self.global_rank}").write_text(" ".join(map(repr, self.losses)))


class Classifier(_ClassifierBody, pl.LightningModule):
    pass


class UnifiedClassifier(_ClassifierBody, unified.LightningModule):
    """The same module on the unified `lightning` package's classes."""


def loader(samples: int = 64, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(samples, 16, generator=g), torch.randint(0, 4, (samples,), generator=g))
    return DataLoader(data, batch_size=batch)


class CausalLM(pl.LightningModule):
    """A transformers causal LM of `family` (llama or opt: tiny, random weights) trained with its own
    forward and loss, `self.model(input_ids, labels=...)`, as a Lightning user writes it; SGD with
    momentum (the attention's key bias has a gradient of rounding noise, which Adam would inflate)."""

    def __init__(self, family: str, losses_to: str = "") -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

        config = (LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, vocab_size=64, max_position_embeddings=16)
                  if family == "llama" else
                  OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, vocab_size=64,
                            max_position_embeddings=16, word_embed_proj_dim=32, dropout=0.0))
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(config)
        self.losses_to = losses_to
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    def on_train_end(self) -> None:
        if self.losses_to:
            Path(f"{self.losses_to}.rank{self.global_rank}").write_text(" ".join(map(repr, self.losses)))


def token_loader(samples: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    return DataLoader(TensorDataset(torch.randint(2, 64, (samples, 16), generator=g)), batch_size=4)
