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

Parameters are counted once, by the first layer that uses them, trained and frozen apart (only
the trained get gradients and optimizer states), and a later layer that uses them again (a tied
head) notes them as shared. The backward's FLOPs are counted and shared among the layers by what
they train. A model that checkpoints inside a layer (a diffusers UNet) can hand its blocks to
`Segments`, which notes what its own checkpointing would keep and recompute.

On the meta device PyTorch's `scaled_dot_product_attention` would fall back to its unfused math
(keeping the whole score matrix); the profile runs it as the fused kernel a CPU or GPU run picks
(`_scaled_dot_product_flash_attention_for_cpu`, whose meta form keeps what the real one keeps: the
output and the log-sum-exp, no scores), so the meta profile equals a real CPU run's, byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field, replace
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
    largest: int = 0                # elements of its largest parameter tensor parallelism splits (see `whole`)
    trained: int | None = None      # of params, those trained (None: all); the frozen have no gradients or states
    backward: float | None = None   # backward FLOPs per token (None: twice the forward's)
    # bytes per token kept with the model's own activation checkpointing on (its checkpointed
    # segments' inputs, the rest outside them, and the largest segment recomputed in backward);
    # None where the layer has no segments of its own
    act_checkpointed: float | None = None
    recomputed: float = 0.0         # of flops, those its checkpointed segments run again in backward
    shared: int = 0                 # elements of weights it uses that an earlier layer owns (a tied head)
    # elements of the matrices (2+ dimensions) among the weights it uses that its backward keeps: a
    # Linear's weight, a tied head's; not an embedding table's (its backward needs only the ids).
    # Tensor-parallel modes that gather a weight's blocks before the product keep the gathered copy.
    matrices: int = 0
    # of params, the elements 1D tensor parallelism leaves whole on every rank (a Loom layer's
    # feature parameters, LayerNorm scales and a position table, and a row Linear's bias; the grid
    # modes split them by features only), those of them trained, and the largest of them
    whole: int = 0
    whole_trained: int = 0
    largest_whole: int = 0
    # of the kept activations, bytes per token of its Linears' inputs (each once): 3D tensor
    # parallelism gathers a Linear's input over q ranks before the product, which keeps the copy
    linear_in: float = 0.0

    @property
    def trained_params(self) -> int:
        return self.params if self.trained is None else self.trained

    @property
    def backward_flops(self) -> float:
        return 2 * self.flops if self.backward is None else self.backward


@dataclass(frozen=True)
class ModelProfile:
    layers: tuple[LayerProfile, ...]
    seq_len: int                    # tokens per sample the profile was taken at
    hidden: int                     # width of the residual stream (tensor- and sequence-parallel traffic)
    heads: int = 1                  # attention heads (what tensor and all-to-all sequence parallelism split)
    vocab: int = 0
    tied: tuple[tuple[str, str], ...] = ()
    act_bytes: int = 4              # bytes per element of the activations profiled
    unit: str = "tokens"            # what one "token" of the profile is (a diffusion model's: a training sample)
    notes: tuple[str, ...] = field(default=())

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def trained_params(self) -> int:
        return sum(layer.trained_params for layer in self.layers)

    @property
    def flops_per_token(self) -> float:
        return sum(layer.flops for layer in self.layers)

    def body_count(self) -> int:
        return sum(layer.body for layer in self.layers)

    def describe(self) -> str:
        trained = self.trained_params
        frozen = f" ({trained / 1e6:,.1f} M trained)" if trained < self.params else ""
        step = self.flops_per_token + sum(layer.backward_flops for layer in self.layers)
        one = self.unit[:-1] if self.unit.endswith("s") else self.unit
        return (f"{self.params / 1e6:,.1f} M parameters{frozen}, {len(self.layers)} layers "
                f"({self.body_count()} repeated), {step / 1e9:.3g} GFLOP per {one} "
                f"forward + backward, activations {self.activation_per_token() / 2**10:,.1f} KiB per {one}")

    @functools.cached_property
    def max_boundary(self) -> float:
        return max((layer.boundary for layer in self.layers), default=0.0)

    @functools.cached_property
    def largest(self) -> int:
        return max((layer.largest for layer in self.layers), default=0)

    @functools.cached_property
    def largest_whole(self) -> int:
        return max((layer.largest_whole for layer in self.layers), default=0)

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


class Segments:
    """What a model's own activation checkpointing keeps, found while profiling it without
    checkpointing: give `run` to the model as its checkpoint function (diffusers'
    `enable_gradient_checkpointing(segments.run)`). Each segment runs plainly; the tensors it saves
    are noted (and passed on to the layer's count, so the plain profile is unchanged), and so are
    its inputs, which checkpointing keeps instead. `kept()`: what autograd holds at the end of the
    forward with checkpointing on, plus the largest segment's saved tensors (recomputed in backward)."""

    def __init__(self) -> None:
        self.reset(None)

    def reset(self, outer: "_Saved | None") -> None:
        self.outer = outer
        self.inside: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.largest = self.flops = 0.0
        self.count = 0

    def run(self, fn: Callable, *args, **kwargs) -> Any:
        outer = self.outer
        if outer is None:
            return fn(*args, **kwargs)
        mine = _Saved(outer.params, outer.hidden)

        def pack(t):
            mine.pack(t)
            self.inside[id(t)] = t
            return outer.pack(t)

        for a in [*args, *kwargs.values()]:
            if torch.is_tensor(a) and id(a) not in outer.params:
                self.inputs[id(a)] = a
        counter = FlopCounterMode(display=False)
        with counter, torch.autograd.graph.saved_tensors_hooks(pack, outer.unpack):
            out = fn(*args, **kwargs)
        self.largest = max(self.largest, mine.split + mine.whole)
        self.count += 1
        self.flops += counter.get_total_flops()
        return out

    def kept(self) -> float:
        """Bytes saved outside the segments, the segments' inputs not among them, and the largest
        segment's saved bytes (each tensor once)."""
        outside = {i: t for i, t in self.outer.seen.items() if i not in self.inside}
        inputs = sum(_nbytes(t) for i, t in self.inputs.items() if i not in outside)
        return sum(_nbytes(t) for t in outside.values()) + inputs + self.largest


def _nbytes(t: torch.Tensor) -> float:
    return t.numel() * t.element_size()


class _Saved:
    """A saved-tensors hook that adds each saved activation's bytes to the current layer."""

    def __init__(self, params: set[int], hidden: int) -> None:
        self.params, self.hidden = params, hidden
        self.seen: dict[int, torch.Tensor] = {}
        self.split = self.whole = 0.0
        self.matrices: dict[int, int] = {}     # the weights (2+ dimensions) saved, each once

    def pack(self, t: torch.Tensor) -> Any:
        base = t._base if t._base is not None else t
        if id(t) in self.params or id(base) in self.params:
            if base.ndim >= 2:
                self.matrices[id(base)] = base.numel()
            return t
        if id(t) in self.seen:
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


@contextlib.contextmanager
def _linear_inputs(model: nn.Module, layer: PipelineLayer, out: dict[int, float]):
    """While a layer's forward runs, the bytes of each distinct input its Linears (torch's or
    Loom's tensor-parallel one) are given and keep for backward, by the input's id (each input held
    until the forward ends: a temporary's id, freed, could be given to the next input)."""
    from core.tensor.layers import Linear

    held = []

    def hook(module, args):
        x = args[0] if args else None
        if torch.is_tensor(x) and torch.is_grad_enabled() and module.weight.requires_grad:   # kept for its gradient
            held.append(x)
            out[id(x)] = _nbytes(x)

    handles = []
    for prefix in layer.modules:
        root = model.get_submodule(prefix) if prefix else model
        handles += [m.register_forward_pre_hook(hook) for m in root.modules() if isinstance(m, (nn.Linear, Linear))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _whole_under_1d(model: nn.Module) -> set[int]:
    """ids of the parameters of `model`'s tensor-parallel layers that 1D tensor parallelism holds
    whole on every rank (as `OneD.param_index` lays them out)."""
    from core.tensor.layers import TPLayer
    from core.tensor.one_d import OneD

    out = set()
    for module in model.modules():
        if isinstance(module, TPLayer):
            for name, kind in module.tp_kinds.items():
                p = getattr(module, name)
                if p is not None and OneD.leaves_whole(kind):
                    out.add(id(p))
    return out


def profile_layers(model: nn.Module, sample: torch.Tensor, loss_fn: Callable[[Any], torch.Tensor],
                   hidden: int, heads: int = 1, vocab: int = 0, segments: Segments | None = None,
                   unit: str = "tokens") -> ModelProfile:
    """Profile `model` (made on the meta device) on `sample` (one micro-batch, also on meta):
    per layer FLOPs, kept activations, boundary sizes and trained parameters per token, and the
    backward's FLOPs as counted, shared among the layers as their trained weights say (a frozen
    layer that nothing trained precedes has no backward; a frozen one after a trained one, the
    gradients of its activations). `loss_fn(output)` turns the last layer's output into the loss.
    `segments`: the model's own checkpoint function while profiling (see `Segments`), for what its
    checkpointing keeps per layer. `unit`: what the sample's elements are (tokens; training samples)."""
    layers = model.pipeline_layers() if hasattr(model, "pipeline_layers") else None
    if layers is None:
        layers = [PipelineLayer("model", ("",), model, body=False)]
    tokens = sample.numel()
    params = {id(p) for p in model.parameters()}
    whole = _whole_under_1d(model)
    owned: set[int] = set()
    out: list[LayerProfile] = []
    x = sample
    dtype_bytes = 4
    fused_flops = 0
    estimated: list[float] = []      # per layer, backward FLOPs per token as its trained weights say
    for layer in layers:
        count = largest = trained = shared = kept_whole = whole_trained = largest_whole = 0
        for prefix in layer.modules:
            module = model.get_submodule(prefix) if prefix else model
            for p in module.parameters():
                if id(p) in whole:
                    largest_whole = max(largest_whole, p.numel())
                else:
                    largest = max(largest, p.numel())
                if id(p) not in owned:
                    owned.add(id(p))
                    count += p.numel()
                    trained += p.numel() if p.requires_grad else 0
                    if id(p) in whole:
                        kept_whole += p.numel()
                        whole_trained += p.numel() if p.requires_grad else 0
                else:
                    shared += p.numel()
        # backward: gradients of the layer's activations where anything at or before it is
        # trained (about the forward's FLOPs), plus its trained weights' gradients (their share of it)
        carries = (torch.is_tensor(x) and x.requires_grad) or trained > 0
        saved = _Saved(params, hidden)
        if segments is not None:
            segments.reset(saved)
        counter, attention = FlopCounterMode(display=False), []
        inputs: dict[int, float] = {}
        with counter, _fused_attention(attention), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack), \
                _linear_inputs(model, layer, inputs):
            x = layer.fn(x)
        if torch.is_tensor(x) and torch.is_floating_point(x):
            dtype_bytes = x.element_size()
        boundary = x.numel() * x.element_size() / tokens if torch.is_tensor(x) else 0.0
        flops = counter.get_total_flops() + sum(attention)
        if carries:
            fused_flops += sum(attention)
        estimated.append(flops / tokens * ((1.0 if carries else 0.0) + (trained / count if count else 0.0)))
        kept = recomputed = None
        if segments is not None and segments.count:
            kept, recomputed = segments.kept() / tokens, segments.flops / tokens
            segments.outer = None
        out.append(LayerProfile(layer.name, count, flops / tokens, saved.split / tokens,
                                saved.whole / tokens, boundary, layer.body, largest, trained,
                                act_checkpointed=kept, recomputed=recomputed or 0.0, shared=shared,
                                matrices=sum(saved.matrices.values()), whole=kept_whole,
                                whole_trained=whole_trained, largest_whole=largest_whole,
                                linear_in=sum(inputs.values()) / tokens))
    # what the loss keeps for backward (a cross-entropy's log-probabilities, tokens x vocabulary),
    # kept with the last layer's activations for every micro-batch in flight
    saved = _Saved(params, hidden)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        loss = loss_fn(x)
    if out and saved.split + saved.whole:
        last = out[-1]
        out[-1] = replace(last, act_split=last.act_split + saved.split / tokens,
                          act_whole=last.act_whole + saved.whole / tokens,
                          act_checkpointed=None if last.act_checkpointed is None
                          else last.act_checkpointed + (saved.split + saved.whole) / tokens)
    counter = FlopCounterMode(display=False)
    with counter:
        loss.backward()
    notes = []
    backward = counter.get_total_flops() + 2 * fused_flops       # the fused kernel's backward: not counted
    # the layers' shares as estimated, scaled to the backward's FLOPs as counted
    scale = backward / tokens / sum(estimated) if sum(estimated) else 0.0
    if sum(estimated) and not 0.75 <= scale <= 1.25:
        notes.append(f"backward counted {scale:.2f}x what the trained weights predict")
    out = [replace(layer, backward=b * scale) for layer, b in zip(out, estimated)]
    tied = tuple(model.pipeline_tied()) if hasattr(model, "pipeline_tied") else ()
    return ModelProfile(tuple(out), seq_len=int(sample.shape[-1]) if sample.ndim > 1 else 1, hidden=hidden,
                        heads=heads, vocab=vocab, tied=tied, act_bytes=dtype_bytes, unit=unit, notes=tuple(notes))
