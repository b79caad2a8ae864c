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
    if cfg.model.hf:
        return _profile_hf(cfg)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab_of(cfg), gradient_checkpointing=False, dropout=0.0)
    with torch.device("meta"):
        model = GPT(model_cfg)
        sample = torch.zeros(1, model_cfg.seq_len + 1, dtype=torch.long)
    return profile_layers(model, sample[:, :-1], lambda logits: model.loss(logits, sample[:, 1:]),
                          hidden=model_cfg.d_model, heads=model_cfg.n_head, vocab=model_cfg.vocab_size)


def _profile_hf(cfg: GPTRecipe) -> ModelProfile:
    """The `model.hf` model, spread by its plan at tp=1, profiled on the meta device (its config's
    vocabulary and width; the recipe's context)."""
    from apps.gpt import hf
    from core.hf import HFCausalLM

    config = hf.model_config(hf.resolve_folder(cfg.model.hf), cfg.model.seq_len, 0)
    with torch.device("meta"):
        model = HFCausalLM(config)
        sample = torch.zeros(1, cfg.model.seq_len + 1, dtype=torch.long)
    return profile_layers(model, sample[:, :-1], lambda logits: model.loss(logits, sample[:, 1:]),
                          hidden=config.hidden_size, heads=config.num_attention_heads, vocab=config.vocab_size)


def axes(cfg: GPTRecipe) -> tuple[str, ...]:
    """Split attention has no attention-probability dropout: no sequence parallelism with dropout
    (Loom's GPT's model.dropout, or a `model.hf` config's dropout probabilities)."""
    dropout = cfg.model.dropout > 0
    if cfg.model.hf:
        from apps.gpt import hf
        from core.hf import load_config, plan_for
        from core.hf.causal_lm import architecture

        config = load_config(hf.resolve_folder(cfg.model.hf))
        dropout = any(getattr(config, k, 0) for k in plan_for(architecture(config)).dropout_keys)
    return ("dp", "pp", "tp") if dropout else ("dp", "pp", "tp", "sp")


TARGET = AppTarget("gpt", GPTRecipe, "gpt/tiny", profile, axes_for=axes)
