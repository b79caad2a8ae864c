"""Sampling tokens from a language model, one at a time: greedy, temperature and top-k; and the
last position's logits of a model spread by a tensor-parallel mode, whole on every rank."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def sample_tokens(last_logits: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, context: int,
                  max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None, top_p: float = 1.0,
                  stop: int | None = None) -> torch.Tensor:
    """Continue `idx` (batch, time) by up to `max_new_tokens`: `last_logits(window)` gives the
    (batch, vocab) logits of each window's last position, the window being the last `context`
    tokens. Temperature 0 is greedy; `top_k` keeps the k most likely tokens (0: all); `top_p` keeps
    the fewest most likely tokens whose probabilities reach p (nucleus sampling, Holtzman et al.
    2019; 1: all). `stop`: a token that ends a row (the row is padded with it after); generation
    ends once every row has stopped."""
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        nxt = choose_tokens(last_logits(idx[:, -context:]), temperature, top_k, top_p, generator)
        if stop is not None:
            nxt = nxt.masked_fill(done.unsqueeze(1), stop)
            done |= nxt.squeeze(1) == stop
        idx = torch.cat([idx, nxt], dim=1)
        if stop is not None and bool(done.all()):
            break
    return idx


def choose_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row, (batch, 1), from (batch, vocab) logits: greedy at temperature 0,
    else sampled after the top-k and top-p cuts."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = _nucleus(logits, top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def _nucleus(logits: torch.Tensor, p: float) -> torch.Tensor:
    """`logits` with every token outside the smallest most-likely set of probability >= p masked out."""
    order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(order.values, dim=-1)
    before = probs.cumsum(dim=-1) - probs          # probability of the tokens ranked above each one
    drop = torch.zeros_like(before, dtype=torch.bool).scatter(-1, order.indices, before >= p)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def last_position_logits(forward: Callable[[torch.Tensor], torch.Tensor], mode, idx: torch.Tensor) -> torch.Tensor:
    """The whole (batch, vocab) logits of the last position of `idx` on every rank, from `forward`
    (ids -> this rank's logits: its part of the vocabulary, and of the batch in the modes that split
    it, which get the batch padded to a multiple of their parts)."""
    from core.tensor import COLUMN

    rows = idx.shape[0]
    pad = -rows % mode.batch_parts
    if pad:
        idx = torch.cat([idx, idx[:1].expand(pad, -1)])
    logits = mode.gather_activation(forward(idx)[:, -1:, :].float(), COLUMN)
    return logits[:rows, -1, :]
