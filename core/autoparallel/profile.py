"""What a model costs, layer by layer, found without building it in memory.

The model is made on the meta device (no storage behind any tensor) and one micro-batch goes
forward and backward through it there: `torch.utils.flop_counter.FlopCounterMode` counts the
matrix products' FLOPs, and a saved-tensors hook records what autograd keeps for backward (the
activations), each tensor once, parameters and their views left out. Both are attributed to the
pipeline layer that ran them (the model's `pipeline_layers()`: embeddings, each block, the head;
a model without them is one layer that pipelines cannot cut).

Activations are split into what tensor parallelism divides and what it leaves whole: under 1D
tensor parallelism the tensors as wide as the residual stream (LayerNorm inputs and outputs, the
residual, its dropout masks) stay whole on every rank (Korthikanti et al. 2022, "Reducing
activation recomputation in large transformer models", section 4.1: the 10 sbh of the layer's
34 sbh + 5 as^2 b); the wider ones (q|k|v, scores, the MLP's 4h) are split. The 2D, 2.5D and 3D
modes split the batch as well, so they divide both.

On the meta device PyTorch's `scaled_dot_product_attention` would fall back to its unfused math
(keeping the whole score matrix); the profile runs it as the fused kernel a CPU or GPU run picks
(`_scaled_dot_product_flash_attention_for_cpu`, whose meta form keeps what the real one keeps: the
output and the log-sum-exp, no scores), so the meta profile equals a real CPU run's, byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from core.pipeline.engine import PipelineLayer


@dataclass(frozen=True)
class LayerProfile:
    name: str
    params: int                     # parameters this layer owns (a tied weight counted where first met)
    flops: float                    # forward FLOPs per token
    act_split: float                # bytes per token kept for backward that tensor parallelism divides
    act_whole: float                # bytes per token kept for backward that 1D tensor parallelism does not
    boundary: float                 # bytes per token of the layer's output (a stage boundary, a checkpoint)
    body: bool = True               # a repeated layer (a transformer block), not the embeddings or the head
    largest: int = 0                # elements of its largest parameter (the least a device must hold of it at once)


@dataclass(frozen=True)
class ModelProfile:
    layers: tuple[LayerProfile, ...]
    seq_len: int                    # tokens per sample the profile was taken at
    hidden: int                     # width of the residual stream (tensor- and sequence-parallel traffic)
    heads: int = 1                  # attention heads (what tensor and all-to-all sequence parallelism split)
    vocab: int = 0
    tied: tuple[tuple[str, str], ...] = ()
    act_bytes: int = 4              # bytes per element of the activations profiled
    notes: tuple[str, ...] = field(default=())

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def flops_per_token(self) -> float:
        return sum(layer.flops for layer in self.layers)

    def body_count(self) -> int:
        return sum(layer.body for layer in self.layers)

    def describe(self) -> str:
        return (f"{self.params / 1e6:,.1f} M parameters, {len(self.layers)} layers "
                f"({self.body_count()} repeated), {self.flops_per_token * 3 / 1e9:.3g} GFLOP per token "
                f"forward + backward, activations {self.activation_per_token() / 2**10:,.1f} KiB per token")

    @functools.cached_property
    def max_boundary(self) -> float:
        return max((layer.boundary for layer in self.layers), default=0.0)

    @functools.cached_property
    def largest(self) -> int:
        return max((layer.largest for layer in self.layers), default=0)

    def activation_per_token(self) -> float:
        return sum(layer.act_split + layer.act_whole for layer in self.layers)


@contextlib.contextmanager
def _fused_attention(flops: list):
    """`F.scaled_dot_product_attention` on meta tensors as the fused kernel (see the module's doc);
    its forward FLOPs (q.k and p.v over every key, as FlopCounterMode counts the unfused one) are
    appended to `flops`, since the counter has no formula for the fused CPU kernel."""
    plain = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.is_meta and attn_mask is None and not kw:
            flops.append(2 * 2 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1])
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, scale=scale)[0]
        return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


class _Saved:
    """A saved-tensors hook that adds each saved activation's bytes to the current layer."""

    def __init__(self, params: set[int], hidden: int) -> None:
        self.params, self.hidden = params, hidden
        self.seen: dict[int, torch.Tensor] = {}
        self.split = self.whole = 0.0

    def pack(self, t: torch.Tensor) -> Any:
        base = t._base if t._base is not None else t
        if id(t) in self.params or id(base) in self.params or id(t) in self.seen:
            return t
        self.seen[id(t)] = t                   # kept alive, so its id is not reused before backward
        size = t.numel() * t.element_size()
        if t.ndim and t.shape[-1] == self.hidden:
            self.whole += size
        else:
            self.split += size
        return t

    @staticmethod
    def unpack(t: Any) -> torch.Tensor:
        return t


def profile_layers(model: nn.Module, sample: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor],
                   hidden: int, heads: int = 1, vocab: int = 0) -> ModelProfile:
    """Profile `model` (made on the meta device) on `sample` (one micro-batch, also on meta):
    per layer FLOPs, kept activations and boundary sizes per token, then the backward's FLOPs
    checked to be about twice the forward's. `loss_fn(output)` turns the last layer's output into
    the loss."""
    layers = model.pipeline_layers() if hasattr(model, "pipeline_layers") else None
    if layers is None:
        layers = [PipelineLayer("model", ("",), model, body=False)]
    tokens = sample.numel()
    params = {id(p) for p in model.parameters()}
    owned: set[int] = set()
    out: list[LayerProfile] = []
    x = sample
    dtype_bytes = 4
    fused_flops = 0
    for layer in layers:
        count = largest = 0
        for prefix in layer.modules:
            module = model.get_submodule(prefix) if prefix else model
            for p in module.parameters():
                largest = max(largest, p.numel())
                if id(p) not in owned:
                    owned.add(id(p))
                    count += p.numel()
        saved = _Saved(params, hidden)
        counter, attention = FlopCounterMode(display=False), []
        with counter, _fused_attention(attention), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            x = layer.fn(x)
        if torch.is_floating_point(x):
            dtype_bytes = x.element_size()
        boundary = x.numel() * x.element_size() / tokens if torch.is_tensor(x) else 0.0
        flops = counter.get_total_flops() + sum(attention)
        fused_flops += sum(attention)
        out.append(LayerProfile(layer.name, count, flops / tokens, saved.split / tokens,
                                saved.whole / tokens, boundary, layer.body, largest))
    loss = loss_fn(x)
    counter = FlopCounterMode(display=False)
    with counter:
        loss.backward()
    notes = []
    forward = sum(layer.flops for layer in out) * tokens
    backward = counter.get_total_flops() + 2 * fused_flops       # the fused kernel's backward: not counted
    if forward and not 1.5 <= backward / forward <= 2.5:
        notes.append(f"backward counted {backward / forward:.2f}x the forward's FLOPs (the cost model assumes 2x)")
    tied = tuple(model.pipeline_tied()) if hasattr(model, "pipeline_tied") else ()
    return ModelProfile(tuple(out), seq_len=int(sample.shape[-1]) if sample.ndim > 1 else 1, hidden=hidden,
                        heads=heads, vocab=vocab, tied=tied, act_bytes=dtype_bytes, notes=tuple(notes))
