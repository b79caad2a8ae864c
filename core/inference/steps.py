"""What one step of generation hands each layer: positions, the attention mask, and the KV cache.

A model offers inference as a sequence of layers (`InferenceLayer`): the embeddings (token ids in,
hidden states out), the decoder blocks (hidden states in and out, reading and extending the KV
cache), and the head (the last position's logits out). The runner (`core.inference.engine`) calls
them one layer at a time over every micro-batch, which is what lets weights that do not fit in
memory stream through it a layer at a time.

Prompts of different lengths are left-padded to a common length, so the new tokens of every row
sit at the same positions of the cache. A row's padding is masked out of every attention, its
positions count from its first real token, and a padding query attends to itself alone (a query
with nothing to attend to would make NaNs that the values then spread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class InferenceLayer:
    name: str
    modules: tuple[str, ...]                                     # whose parameters the layer reads
    run: Callable[[torch.Tensor, "Step"], torch.Tensor]


class KVCache:
    """Keys and values of every layer for one micro-batch, made at full length (the prompt and every
    new token) on their first use, on `device` (the compute device, or the host to save the
    device's memory: the filled part then travels to `compute_device` at each use).

    `update(k, v, layer)` is what the attention calls: it writes the step's (batch, heads, t, size)
    keys and values after those already held and returns all of them; `advance(t)` moves the
    write position once every layer has seen the step. transformers' attention modules call the
    same `update(key, value, layer_idx, ...)`, so the cache serves both Loom's and their models."""

    def __init__(self, layers: int, capacity: int, device: torch.device | str = "cpu",
                 compute_device: torch.device | str | None = None, rows: int | None = None) -> None:
        """`rows`: the batch the cache is made for, where `part` hands out row ranges of it (by
        default the batch of the first update)."""
        self.capacity = capacity
        self.rows = rows
        self.device = torch.device(device)
        self.compute_device = torch.device(compute_device) if compute_device is not None else self.device
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.length = 0

    def part(self, start: int, stop: int) -> "KVCacheRows":
        """Rows start..stop of this cache, as a cache of their own that writes into this one's
        tensors: micro-batches fill their rows one at a time (the prefill), and later steps may run
        every row at once against the whole cache, with no copy between the two."""
        if self.rows is None or not 0 <= start < stop <= self.rows:
            raise ValueError(f"rows {start}..{stop} are not rows of a cache made for {self.rows}")
        return KVCacheRows(self, start, stop)

    def tensors(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s whole key and value tensors, made on first use after `key`/`value`."""
        if self.keys[layer_idx] is None:
            b, h, _, d = key.shape
            b = self.rows or b
            self.keys[layer_idx] = torch.empty(b, h, self.capacity, d, dtype=key.dtype, device=self.device)
            self.values[layer_idx] = torch.empty(b, h, self.capacity, value.shape[-1], dtype=value.dtype,
                                                 device=self.device)
        return self.keys[layer_idx], self.values[layer_idx]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self._write(key, value, layer_idx, slice(None))

    def _write(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, rows: slice):
        end = self.length + key.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {end}")
        keys, values = self.tensors(layer_idx, key, value)
        keys, values = keys[rows], values[rows]
        if keys.shape[0] != key.shape[0]:
            raise ValueError(f"a step of {key.shape[0]} rows against a KV cache of {keys.shape[0]}")
        keys[:, :, self.length:end].copy_(key)
        values[:, :, self.length:end].copy_(value)
        keys, values = keys[:, :, :end], values[:, :, :end]
        if self.device != self.compute_device:
            keys = keys.to(self.compute_device, non_blocking=True)
            values = values.to(self.compute_device, non_blocking=True)
        return keys, values

    def advance(self, t: int) -> None:
        self.length += t

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


class KVCacheRows:
    """Some rows of a `KVCache` (`KVCache.part`): steps of those rows read and extend them. The
    write position is the whole cache's: every part is written at a step before it advances."""

    def __init__(self, whole: KVCache, start: int, stop: int) -> None:
        self.whole, self.rows = whole, slice(start, stop)

    @property
    def length(self) -> int:
        return self.whole.length

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.whole._write(key, value, layer_idx, self.rows)


@dataclass
class Step:
    """One forward of one micro-batch: `positions` (batch, t) of the new tokens, `mask` (batch, 1,
    t, cached + t) True where a query may attend, and the cache to read and extend."""

    positions: torch.Tensor
    mask: torch.Tensor
    cache: KVCache


def make_step(pads: torch.Tensor, t: int, cache: KVCache) -> Step:
    """The step of `t` new tokens after those `cache` holds, for rows left-padded by `pads`."""
    device = pads.device
    start = cache.length
    query = start + torch.arange(t, device=device)                       # absolute slots of the new tokens
    key = torch.arange(start + t, device=device)
    causal = key[None, None, :] <= query[None, :, None]                 # (1, t, T)
    real = key[None, None, :] >= pads[:, None, None]                     # (B, 1, T)
    itself = key[None, None, :] == query[None, :, None]
    mask = ((causal & real) | itself).unsqueeze(1)
    positions = (query[None, :] - pads[:, None]).clamp(min=0)
    return Step(positions, mask, cache)
