"""The attention a planned Hugging Face model runs: registered with transformers' attention
interface under the name "loom", so the model's own attention modules call it where they would
call PyTorch's SDPA.

It reads what the plan marked on the module (`loom_mode`, `loom_sequence`): on this rank's heads,
causal attention through `scaled_dot_product_attention` (its dropout drawn per rank where heads
split), or, where sequences are split, `core.sequence`'s ring or all-to-all attention over every
rank's keys and values. Grouped-query attention (fewer key/value heads) is handled by SDPA itself,
and by repeating the key/value heads before a sequence-split attention. The causal mask is the
attention's own: planned models are language models trained on unpadded windows, and the plan's
runner passes no mask. Generation (`core.inference`) passes one: its keys include the cached
ones, and its rows are left-padded.
"""

from __future__ import annotations

import contextlib
import math

import torch.nn.functional as F

NAME = "loom"


def loom_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """(batch, heads, time, head size) queries, keys and values -> ((batch, time, heads, head size), None)."""
    mode = getattr(module, "loom_mode", None)
    seq = getattr(module, "loom_sequence", None)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    groups = query.shape[1] // key.shape[1]
    if seq is not None and seq.size > 1:
        if groups > 1:
            key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
        # core.sequence's attention scales by 1/sqrt(head size); the model's own scale goes on q
        query = query * (scale * math.sqrt(query.shape[-1]))
        out = seq.attention(query, key, value, causal=True)
    elif attention_mask is not None:     # generation (core.inference): cached keys, left-padded rows
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale,
                                             enable_gqa=groups > 1)
    else:
        split = mode is not None and mode.size > 1 and dropout > 0
        with mode.split_rng() if split else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True, scale=scale,
                                                 enable_gqa=groups > 1)
    return out.transpose(1, 2), None


def register() -> str:
    """Make "loom" an attention implementation transformers knows (once per process); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, loom_attention)
    return NAME
