"""Running a schedule: one pipeline step on this rank.

A model that can be pipelined lists its layers in order (`PipelineLayer`: the submodules it
owns and the function that runs it); `partition` cuts them into p x v contiguous stages and
`StageRunner` runs this rank's (virtual) stages through a schedule's actions:

- F(micro, virtual): take the input (the micro-batch itself on the first virtual stage, else the
  activation received from the previous one), run the stage, send the output on, or on the last
  virtual stage compute the loss.
- B(micro, virtual): start backward from the loss, or from the output gradient received from the
  next virtual stage, and send the input's gradient back.

Point-to-point messages are tagged by (micro-batch, virtual stage, kind), so no two can be
confused whatever order they arrive in. Activation shapes are agreed once per step and boundary:
the first forward message carries a small header (dtype and shape); every later one is the bare
tensor. Sends are asynchronous (compute goes on while they travel) and the receive the next action
needs is posted before the current action computes, so it arrives while this rank works.

Every compute span is time-stamped and the bytes autograd saves for backward (activations, not
parameters) are counted per micro-batch, so a benchmark can read the bubble and the peak
activation memory of each stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from core.distributed.comm import AxisGroup, irecv, isend
from core.errors import LoomError
from core.pipeline.schedule import Action

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32]
_HEADER = 10      # dtype code, ndim, up to 8 dims


@dataclass
class PipelineLayer:
    """One unit of a model that a stage may hold: `modules` names the submodules it owns (their
    parameters move with it), `fn` maps the previous layer's output to its own. `body` layers are
    the repeated ones (transformer blocks) that `partition(by="layers")` counts; the others
    (embeddings, the head) ride with the first or last stage."""

    name: str
    modules: tuple[str, ...]
    fn: Callable[[Any], Any]
    body: bool = True


def _balanced(weights: list[float], parts: int) -> list[int]:
    """Cut points splitting `weights` into `parts` contiguous non-empty runs with the smallest
    largest sum (dynamic programming; n is a model's layer count)."""
    n = len(weights)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, i = [n], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def partition(layers: list[PipelineLayer], parts: int, by: str = "layers",
              weights: list[float] | None = None) -> list[list[int]]:
    """Layer indices of each of `parts` stages (p x v virtual stages), in order.

    - "layers": the same number of body layers per stage (refused when they do not divide);
    - "params": balanced by parameter count (`weights`, one per layer);
    - "cost": balanced by a measured per-layer cost (`weights`).
    """
    body = [i for i, layer in enumerate(layers) if layer.body]
    if by == "layers":
        if len(body) % parts or not body:
            fits = [d for d in range(1, len(body) + 1) if len(body) % d == 0]
            raise LoomError(f"the model's {len(body)} layers do not divide into {parts} pipeline stages "
                            f"(parallel.pp x parallel.virtual_stages); stage counts that divide them: "
                            f"{', '.join(map(str, fits))}; or balance unequal stages with parallel.pp_partition=params")
        per = len(body) // parts
        stages = [body[k * per:(k + 1) * per] for k in range(parts)]
        stages[0] = list(range(0, stages[0][-1] + 1))                    # leading layers (embeddings)
        stages[-1] = list(range(stages[-1][0], len(layers)))             # trailing layers (the head)
        return stages
    if by in ("params", "cost"):
        if weights is None or len(weights) != len(layers):
            raise ValueError(f"partition by {by} needs one weight per layer")
        if len(layers) < parts:
            raise LoomError(f"the model has {len(layers)} pipeline layers, fewer than the {parts} stages asked for")
        bounds = _balanced(weights, parts)
        return [list(range(bounds[k], bounds[k + 1])) for k in range(parts)]
    raise LoomError(f"parallel.pp_partition={by} is unknown; choose layers, params or cost")


def prune(model: nn.Module, layers: list[PipelineLayer], keep: set[int]) -> None:
    """Replace every submodule owned by a layer outside `keep` with an empty placeholder, so this
    rank holds (and its optimizer sees) only its stage's parameters, under their usual names."""
    owned = {name for i in keep for name in layers[i].modules}
    for i, layer in enumerate(layers):
        if i in keep:
            continue
        for name in layer.modules:
            if name in owned:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                parent[int(child)] = nn.Identity()
            else:
                setattr(parent, child, nn.Identity())


@dataclass
class StepRecord:
    """What one step did on this rank: compute spans and saved-activation bytes."""

    spans: list[tuple[str, int, int, float, float]] = field(default_factory=list)  # kind, micro, virtual, t0, t1
    peak_activation_bytes: int = 0
    peak_held: int = 0
    peak_sends: int = 0           # sends this rank kept in flight at once (each keeps its tensor)


class StageRunner:
    """Runs this rank's virtual stages (lists of layers) through a schedule's actions."""

    def __init__(self, stages: list[list[PipelineLayer]], axis: AxisGroup, autocast: Callable[[], Any],
                 params: list[torch.Tensor]) -> None:
        self.stages = stages
        self.axis = axis
        self.p, self.s, self.v = axis.size, axis.rank, len(stages)
        self.autocast = autocast
        self._param_storages = {t.untyped_storage().data_ptr() for t in params}
        # (pack, unpack) of saved tensors for the weights' keeper, when they live in chunks
        # (`core.memory.chunked_model.ChunkedModel`): the chunks a backward reads are fetched again
        self.saved_hooks: tuple[Callable, Callable] | None = None
        # called before each backward action with whether it is its virtual stage's last in the step
        self.before_backward: Callable[[Action, bool], None] | None = None

    # ---- topology and tags -----------------------------------------------------------------

    def _virtual(self, virtual: int) -> int:
        return virtual * self.p + self.s

    @property
    def _last(self) -> int:
        return self.p * self.v - 1

    def _tag(self, micro: int, sender: int, kind: int) -> int:
        return (micro * self.p * self.v + sender) * 3 + kind       # kind: 0 header, 1 activation, 2 gradient

    # ---- messages ----------------------------------------------------------------------------

    def _send(self, t: torch.Tensor, to_virtual: int, tag: int) -> None:
        t = t.detach().contiguous()
        self._sends[tag] = (isend(t, self.axis, to_virtual % self.p, tag), t)

    def _send_activation(self, y: torch.Tensor, micro: int, g: int) -> None:
        if g not in self._announced:
            if y.dtype not in _DTYPES or y.dim() > _HEADER - 2:
                raise LoomError(f"a pipeline stage's output must be a tensor of at most {_HEADER - 2} dims and "
                                f"one of {_DTYPES}; got {y.dtype} {tuple(y.shape)}")
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[0], header[1] = _DTYPES.index(y.dtype), y.dim()
            header[2:2 + y.dim()] = torch.tensor(y.shape)
            self._send(header, g + 1, self._tag(micro, g, 0))
            self._announced.add(g)
        self._send(y, g + 1, self._tag(micro, g, 1))

    def _post(self, a: Action) -> None:
        """Post the receive `a` will need, if its shape is known and it is not posted yet."""
        g = self._virtual(a.virtual)
        if a.kind == "F":
            if g == 0 or (g - 1) not in self._shapes:
                return
            tag, src, (shape, dtype) = self._tag(a.micro, g - 1, 1), g - 1, self._shapes[g - 1]
        else:
            if g == self._last or (a.micro, a.virtual) not in self._held:
                return
            y = self._held[(a.micro, a.virtual)][1]
            tag, src, shape, dtype = self._tag(a.micro, g + 1, 2), g + 1, y.shape, y.dtype
        if tag not in self._posted:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self._posted[tag] = (irecv(buf, self.axis, src % self.p, tag), buf)

    def _receive(self, tag: int, src: int, shape, dtype) -> torch.Tensor:
        if tag not in self._posted:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self._posted[tag] = (irecv(buf, self.axis, src % self.p, tag), buf)
        work, buf = self._posted.pop(tag)
        work.wait()
        return buf

    def _receive_activation(self, micro: int, g: int) -> torch.Tensor:
        if g - 1 not in self._shapes:
            header = self._receive(self._tag(micro, g - 1, 0), g - 1, (_HEADER,), torch.int64)
            dtype, ndim = _DTYPES[int(header[0])], int(header[1])
            self._shapes[g - 1] = (tuple(int(d) for d in header[2:2 + ndim]), dtype)
        shape, dtype = self._shapes[g - 1]
        return self._receive(self._tag(micro, g - 1, 1), g - 1, shape, dtype)

    # ---- one step ----------------------------------------------------------------------------

    def run(self, actions: list[Action], batches: list, first_input: Callable[[Any], Any],
            criterion: Callable[[Any, Any], torch.Tensor], backward: Callable[[torch.Tensor], None] | None,
            device: torch.device, record: StepRecord | None = None) -> torch.Tensor | None:
        """Run `actions` over the micro-batches `batches`. `backward(loss)` starts backward on the
        last virtual stage (the optimizer's, for loss scaling); None runs forwards only. Returns
        the mean loss over the micro-batches on the rank holding the last virtual stage, else None."""
        self.device = device
        self._sends: dict[int, tuple] = {}     # by tag: each send's work and the tensor it must keep
        self._posted: dict[int, tuple] = {}
        self._announced: set[int] = set()
        self._shapes: dict[int, tuple] = {}
        self._held: dict[tuple[int, int], tuple] = {}
        m = len(batches)
        losses = []
        live_bytes, held_bytes = 0, {}
        forward_only = backward is None
        last_backward = {a.virtual: i for i, a in enumerate(actions) if a.kind == "B"}
        for index, a in enumerate(actions):
            g = self._virtual(a.virtual)
            if index + 1 < len(actions):
                self._post(actions[index + 1])
            if a.kind == "F":
                x = first_input(batches[a.micro]) if g == 0 else self._receive_activation(a.micro, g)
                if g > 0 and not forward_only:
                    x.requires_grad_(True)
                saved = [0]
                inner_pack, unpack = self.saved_hooks or (None, lambda t: t)

                def pack(t, saved=saved, inner_pack=inner_pack):
                    if t.untyped_storage().data_ptr() not in self._param_storages:
                        saved[0] += t.numel() * t.element_size()
                    return t if inner_pack is None else inner_pack(t)

                t0 = time.perf_counter()
                with torch.autograd.graph.saved_tensors_hooks(pack, unpack), \
                        torch.set_grad_enabled(not forward_only), self.autocast():
                    y = x
                    for layer in self.stages[a.virtual]:
                        y = layer.fn(y)
                    if g == self._last:
                        y = criterion(y, batches[a.micro])
                if g == self._last:
                    losses.append(y.detach().float())
                else:
                    self._send_activation(y, a.micro, g)
                t1 = time.perf_counter()
                if not forward_only:
                    self._held[(a.micro, a.virtual)] = (x, y)
                    held_bytes[(a.micro, a.virtual)] = saved[0]
                    live_bytes += saved[0]
                if record is not None:
                    record.spans.append(("F", a.micro, a.virtual, t0, t1))
                    record.peak_activation_bytes = max(record.peak_activation_bytes, live_bytes)
                    record.peak_held = max(record.peak_held, len(self._held))
            else:
                if self.before_backward is not None:
                    self.before_backward(a, last_backward[a.virtual] == index)
                x, y = self._held.pop((a.micro, a.virtual))
                grad = None
                if g < self._last:
                    grad = self._receive(self._tag(a.micro, g + 1, 2), g + 1, y.shape, y.dtype)
                    # the next stage sent it after its backward of this micro-batch, so it has
                    # received the activation sent for it: let that go (gloo's sends never say they
                    # are done until waited on, and each kept a stage output to the step's end)
                    for kind in (0, 1):
                        done = self._sends.pop(self._tag(a.micro, g, kind), None)
                        if done is not None:
                            done[0].wait()
                t0 = time.perf_counter()
                if g == self._last:
                    backward(y / m)
                else:
                    torch.autograd.backward(y, grad)
                if g > 0:
                    self._send(x.grad, g - 1, self._tag(a.micro, g, 2))
                t1 = time.perf_counter()
                live_bytes -= held_bytes.pop((a.micro, a.virtual))
                if record is not None:
                    record.spans.append(("B", a.micro, a.virtual, t0, t1))
            if record is not None:
                record.peak_sends = max(record.peak_sends, len(self._sends))
            self._sends = {tag: sent for tag, sent in self._sends.items() if not sent[0].is_completed()}
        for work, _ in self._sends.values():
            work.wait()
        if self._held or self._posted:
            raise RuntimeError(f"pipeline step ended with work left: held {list(self._held)}, "
                               f"posted {list(self._posted)}")
        return torch.stack(losses).mean() if losses else None
