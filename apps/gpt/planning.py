"""What the auto-parallel planner needs of the GPT app: its recipe and its model, profiled on the
meta device (`python -m core.plan --recipe gpt/...`, `parallel.auto=true`)."""

from __future__ import annotations

import dataclasses

import torch

from apps.gpt.config import GPTRecipe
from apps.gpt.model import GPT
from core.autoparallel.profile import ModelProfile, profile_layers
from core.autoparallel.target import AppTarget


def vocab_of(cfg: GPTRecipe) -> int:
    """model.vocab_size, or what the tokenizer will make it (bytes: 257; BPE: data.bpe_vocab),
    rounded up to a multiple of 64 as the app rounds it."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    tokens = 257 if cfg.data.tokenizer == "bytes" else cfg.data.bpe_vocab
    return -(-tokens // 64) * 64


def profile(cfg: GPTRecipe) -> ModelProfile:
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_of(cfg), gradient_checkpointing=False, dropout=0.0)
    with torch.device("meta"):
        model = GPT(model_cfg)
        sample = torch.zeros(1, model_cfg.seq_len + 1, dtype=torch.long)
    return profile_layers(model, sample[:, :-1], lambda logits: model.loss(logits, sample[:, 1:]),
                          hidden=model_cfg.d_model, heads=model_cfg.n_head, vocab=model_cfg.vocab_size)


def axes(cfg: GPTRecipe) -> tuple[str, ...]:
    """Split attention has no attention-probability dropout: no sequence parallelism with dropout."""
    return ("dp", "pp", "tp") if cfg.model.dropout > 0 else ("dp", "pp", "tp", "sp")


TARGET = AppTarget("gpt", GPTRecipe, "gpt/tiny", profile, axes_for=axes)
