"""Tensor-parallel modes as strategies: each owns how weights and activations are split over the
tensor-parallel ranks and what it communicates; the layers (`core.tensor.layers`) only ask it.

A mode answers two kinds of question.

*Where things live.* For a parameter of a given kind (`ParamKind`: a Linear's weight or bias in
its role, or a feature vector such as a LayerNorm scale), `param_index` says which indices of the
serial (unsplit) tensor a rank holds, one index list per dimension. From that one answer the base
class derives sharding (`shard`), gathering back to the serial tensor (`gather`, which is how
checkpoints move between layouts), how many ranks hold the same part (`replicas`, used for
gradient norms), and the same for activations (`activation_index`, `gather_activation`,
`local_batch`).

*How to compute.* `linear`, `embedding`, `layer_norm`, `features` (a split feature parameter as
the layer should use it), `cross_entropy` run on this rank's parts with the communication the
mode's design prescribes; autograd gives the backward its adjoint communication.

Gradient convention, shared by every mode: after backward, each rank's gradient of a local
tensor is the derivative of the one global loss with respect to that local tensor. The
collectives of `core.distributed.comm` (all-gather <-> reduce-scatter, all-reduce <-> all-reduce)
and the region operators of `core.tensor.functional` preserve it; a parameter replicated over
ranks that each use it on different tokens has its gradient summed over them in backward.

The modes: `1d` (Megatron-LM), `2d` (Optimus / SUMMA on q x q), `2.5d` (Tesseract, q x q x d),
`3d` (q x q x q). `make_mode` builds one from the recipe and refuses layouts that do not fit.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.distributed import ParallelMesh
from core.distributed.comm import AxisGroup, _all_gather, all_reduce_
from core.errors import LoomError

COLUMN, ROW = "column", "row"


@dataclass(frozen=True)
class ParamKind:
    """What a parameter is to the modes. `what`: "weight" (a Linear's (out, in) weight; the
    vocabulary embedding is the weight of a column Linear from the model width to the vocabulary,
    so a tied head and embedding share one layout), "bias" (out,), or "features" (any tensor
    whose last dimension is the model width: LayerNorm scales, position embeddings). `groups`:
    the output features are that many stacked blocks (attention's q, k, v), each split on its own
    so that every rank holds whole heads of each."""

    what: str
    role: str = COLUMN
    groups: int = 1


EMBEDDING = ParamKind("weight", COLUMN, 1)
FEATURES = ParamKind("features")


# ---------------------------------------------------------------------------------------------
# Index lists
# ---------------------------------------------------------------------------------------------

def split_index(n: int, parts: int, index: int) -> torch.Tensor:
    """Part `index` of `parts` equal contiguous parts of range(n)."""
    if n % parts:
        raise ValueError(f"a dimension of {n} does not split into {parts} tensor-parallel parts")
    size = n // parts
    return torch.arange(index * size, (index + 1) * size)


def grouped_index(n: int, groups: int, parts: int, index: int) -> torch.Tensor:
    """Part `index` of each of `groups` stacked blocks of range(n), concatenated."""
    block = n // groups
    return torch.cat([g * block + split_index(block, parts, index) for g in range(groups)])


def sub_index(idx: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    if idx.numel() % parts:
        raise ValueError(f"a dimension of {idx.numel()} does not split into {parts} tensor-parallel parts")
    return idx.chunk(parts)[index]


def _take(t: torch.Tensor, index: tuple) -> torch.Tensor:
    for dim, idx in enumerate(index):
        if idx is not None:
            t = t.index_select(dim, idx.to(t.device))
    return t


def _place(out: torch.Tensor, index: tuple, part: torch.Tensor) -> None:
    full = [torch.arange(n) if idx is None else idx for n, idx in zip(out.shape, index)]
    grids = torch.meshgrid(*[g.to(out.device) for g in full], indexing="ij")
    out[grids] = part


class TPMode(ABC):
    name = "mode"
    batch_parts = 1            # the batch is split into this many parts over the group
    split_activations = False  # True where no activation is replicated (dropout draws per rank)

    def __init__(self, axis: AxisGroup) -> None:
        self.axis = axis
        self.size = axis.size
        self.rank = axis.rank

    # ---- where things live -----------------------------------------------------------------

    @property
    @abstractmethod
    def head_parts(self) -> int:
        """Attention heads are split into this many parts (each rank holds whole heads)."""

    @abstractmethod
    def divisor(self, what: str) -> int:
        """What the size `what` ("vocab": the vocabulary, "width": the model width) must be a
        multiple of in this mode."""

    @abstractmethod
    def param_index(self, kind: ParamKind, shape: tuple[int, ...], rank: int) -> tuple:
        """Per dimension, the serial indices tp rank `rank` holds (None: all of them)."""

    @abstractmethod
    def activation_index(self, role: str | None, batch: int, features: int, groups: int, rank: int) -> tuple:
        """(batch indices, feature indices) that rank `rank` holds of an activation with `batch`
        rows and `features` features: the output of a Linear of this `role` (with `groups` stacked
        output blocks), or with role None the residual stream (the input of a column Linear)."""

    @abstractmethod
    def feature_parts(self, role: str | None) -> int:
        """Into how many parts the features of such an activation are split."""

    def replicas(self, kind: ParamKind, shape: tuple[int, ...]) -> int:
        """How many tp ranks hold each part of a parameter of this kind."""
        mine = self.param_index(kind, shape, self.rank)
        held = math.prod(n if idx is None else idx.numel() for n, idx in zip(shape, mine))
        return self.size * held // math.prod(shape)

    def shard(self, kind: ParamKind, serial: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return serial
        return _take(serial, self.param_index(kind, tuple(serial.shape), self.rank)).clone()

    def gather(self, kind: ParamKind, local: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The serial tensor from every rank's part (a collective over the group, no autograd)."""
        if self.size == 1:
            return local
        return self._assemble(local, shape, lambda r: self.param_index(kind, shape, r))

    def gather_activation(self, local: torch.Tensor, role: str | None = None, groups: int = 1) -> torch.Tensor:
        """The whole activation from every rank's part (no autograd; for sampling and tests)."""
        if self.size == 1:
            return local
        shape = (local.shape[0] * self.batch_parts, *local.shape[1:-1], local.shape[-1] * self.feature_parts(role))
        return self._assemble(local, shape, lambda r: self._full_index(role, shape, groups, r))

    def _full_index(self, role, shape, groups, rank) -> tuple:
        batch, feat = self.activation_index(role, shape[0], shape[-1], groups, rank)
        return (batch,) + (None,) * (len(shape) - 2) + (feat,)

    def _assemble(self, local: torch.Tensor, shape: tuple[int, ...], index_of) -> torch.Tensor:
        every = _all_gather(local.detach().contiguous().unsqueeze(0), self.axis, 0)
        out = torch.empty(shape, dtype=local.dtype, device=local.device)
        for r in range(self.size):
            _place(out, index_of(r), every[r])
        return out

    def local_batch(self, t: torch.Tensor, role: str | None = None) -> torch.Tensor:
        """This rank's rows of a batch-major tensor replicated over the group (such as the targets
        of the logits a column Linear produced)."""
        batch = self.activation_index(role, t.shape[0], self.feature_parts(role), 1, self.rank)[0]
        return t if batch is None else t.index_select(0, batch.to(t.device))

    def split_input(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of a replicated residual-stream activation; in backward every rank
        gets the whole input gradient."""
        return x if self.size == 1 else _SplitInput.apply(x, self)

    @contextlib.contextmanager
    def split_rng(self):
        """Random numbers for a split region (dropout on this rank's heads or tokens): each rank
        draws its own stream, derived from the default generator, which advances the same on
        every rank, so runs stay reproducible and resumable without any extra state."""
        if self.size == 1:
            yield
            return
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        derived = (seed + 1_000_003 * (self.rank + 1)) % (2 ** 63)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        devices = [torch.cuda.current_device()] if cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(derived)
            if cuda:
                torch.cuda.manual_seed(derived)
            yield

    # ---- how to compute ----------------------------------------------------------------------

    @abstractmethod
    def linear(self, x, weight, bias, role: str) -> torch.Tensor: ...

    @abstractmethod
    def embedding(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, time), the same on every rank -> this rank's residual-stream part."""

    @abstractmethod
    def layer_norm(self, x, weight, bias, eps: float) -> torch.Tensor: ...

    @abstractmethod
    def rms_norm(self, x, weight, eps: float) -> torch.Tensor:
        """RMSNorm of the residual stream (Llama's), wherever its features live."""

    @abstractmethod
    def features(self, param: torch.Tensor) -> torch.Tensor:
        """A feature parameter (kind FEATURES) as the forward should use it."""

    @abstractmethod
    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all tokens of the vocabulary-split logits of a column Linear
        (never gathered); `target` is the whole (batch, time) target on every rank. The value is
        the global mean on every rank; the gradient is this rank's share."""

    def describe(self) -> str:
        return f"{self.name} over {self.size} ranks"


class _SplitInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mode: TPMode):
        ctx.mode = mode
        return _take(x, mode._full_index(None, tuple(x.shape), 1, mode.rank)).contiguous()

    @staticmethod
    def backward(ctx, g):
        return ctx.mode.gather_activation(g), None


# ---------------------------------------------------------------------------------------------
# Pieces the modes share
# ---------------------------------------------------------------------------------------------

def masked_lookup(ids: torch.Tensor, weight: torch.Tensor, lo: int) -> torch.Tensor:
    """Embedding rows [lo, lo + rows) of the vocabulary; zeros for ids outside them."""
    rows = weight.shape[0]
    outside = (ids < lo) | (ids >= lo + rows)
    local = (ids - lo).masked_fill(outside, 0)
    return F.embedding(local, weight).masked_fill(outside.unsqueeze(-1), 0.0)


def split_layer_norm(x, weight, bias, eps: float, axis: AxisGroup, width: int):
    """LayerNorm over features split across `axis`: two all-reduces of one number per token (the
    sum, then the centred sum of squares), each all-reduced again in backward."""
    from core.distributed.comm import all_reduce

    mean = all_reduce(x.sum(dim=-1, keepdim=True), axis) / width
    centred = x - mean
    var = all_reduce(centred.square().sum(dim=-1, keepdim=True), axis) / width
    y = centred * torch.rsqrt(var + eps) * weight
    return y if bias is None else y + bias


def rms_norm(x, weight, eps: float, axis: AxisGroup | None = None, width: int | None = None):
    """RMSNorm (Zhang & Sennrich 2019) over the last dimension, in fp32 and back to the input's
    dtype before the scale (as Llama computes it); with `axis`, the features are split across it and
    the sum of squares is all-reduced (one number per token, all-reduced again in backward)."""
    from core.distributed.comm import all_reduce

    xf = x.float()
    squares = xf.square().sum(dim=-1, keepdim=True)
    if axis is not None and axis.size > 1:
        squares = all_reduce(squares, axis)
    y = xf * torch.rsqrt(squares / (width or x.shape[-1]) + eps)
    return weight * y.to(x.dtype)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits split over the vocabulary (this rank holds columns
    [lo, lo + local) ), without gathering them: three all-reduces over `axis` of one number per
    token (the maximum, the sum of exponentials, the target's logit); the backward is local
    (softmax minus one-hot on this rank's columns)."""

    @staticmethod
    def forward(ctx, logits, target, axis: AxisGroup, lo: int):
        flat = logits.reshape(-1, logits.shape[-1]).float()
        t = target.reshape(-1)
        vocab_local = flat.shape[-1]
        peak = flat.max(dim=-1).values
        if axis.size > 1:
            all_reduce_(peak, axis, "max")
        shifted = flat - peak.unsqueeze(-1)
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        inside = (t >= lo) & (t < lo + vocab_local)
        local_t = (t - lo).masked_fill(~inside, 0)
        picked = shifted.gather(1, local_t.unsqueeze(1)).squeeze(1).masked_fill(~inside, 0.0)
        if axis.size > 1:
            all_reduce_(total, axis, "sum")
            all_reduce_(picked, axis, "sum")
        loss = total.log() - picked
        softmax = exp / total.unsqueeze(-1)
        ctx.save_for_backward(softmax, local_t, inside)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return loss.mean()

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, inside = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0])
        grad[rows[inside], local_t[inside]] -= 1.0
        grad *= g / grad.shape[0]
        return grad.view(ctx.shape).to(ctx.dtype), None, None, None


def token_split_loss(local_mean: torch.Tensor, parts: int, tokens: AxisGroup) -> torch.Tensor:
    """A loss whose tokens are split into `parts` equal parts over `tokens`: the value is the
    global mean on every rank, the gradient this rank's share (its mean / parts)."""
    mine = local_mean / parts
    total = mine.detach().clone()
    if tokens.size > 1:
        all_reduce_(total, tokens, "sum")
    return mine + (total - mine.detach())


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def _square_root(n: int) -> int | None:
    q = math.isqrt(n)
    return q if q * q == n else None


def _cube_root(n: int) -> int | None:
    q = round(n ** (1 / 3))
    return next((c for c in (q - 1, q, q + 1) if c > 0 and c ** 3 == n), None)


def _valid_sizes(test, limit: int = 64) -> str:
    return ", ".join(str(n) for n in range(2, limit + 1) if test(n))


def batch_parts(name: str, tp: int, depth: int = 1) -> int:
    """How many parts the mode splits each micro-batch into (its `batch_parts`), known before any
    process joins: 1d none, 2d q, 2.5d d x q, 3d q x q."""
    q = tp_grid(name, tp, depth)
    return {"1d": 1, "2d": q, "2.5d": depth * q, "3d": q * q}[name]


def tp_grid(name: str, tp: int, depth: int = 1) -> int:
    """q of the mode's grid for `tp` processes (1d: tp itself), or one error naming the sizes that
    would fit. Needs no processes: the session asks it before it compares the layout with the world."""
    if name == "1d":
        return tp
    if name == "2d":
        q = _square_root(tp)
        if q is None:
            raise LoomError(f"parallel.tp_mode=2d needs a square parallel.tp (q x q); tp={tp} is not one. "
                            f"Valid sizes: {_valid_sizes(lambda n: _square_root(n) is not None)}, ...")
        return q
    if name == "2.5d":
        q = _square_root(tp // depth) if tp % depth == 0 else None
        if q is None:
            fits = [f"{depth * s * s} (q={s}, d={depth})" for s in range(2, 9)]
            raise LoomError(f"parallel.tp_mode=2.5d needs parallel.tp = q x q x d with d = parallel.tp_depth="
                            f"{depth}; tp={tp} is not one. Valid sizes with d={depth}: {', '.join(fits[:6])}, ...")
        return q
    if name == "3d":
        q = _cube_root(tp)
        if q is None:
            raise LoomError(f"parallel.tp_mode=3d needs a cube parallel.tp (q x q x q); tp={tp} is not one. "
                            f"Valid sizes: {_valid_sizes(lambda n: _cube_root(n) is not None, 512)}")
        return q
    raise LoomError(f"parallel.tp_mode={name} is unknown; choose 1d, 2d, 2.5d or 3d")


def make_mode(name: str, mesh: ParallelMesh, depth: int = 1) -> TPMode:
    """The tensor-parallel mode `name` over the mesh's tp axis (every process must call this: the
    2D, 2.5D and 3D modes create their sub-groups collectively)."""
    from core.tensor.one_d import OneD
    from core.tensor.three_d import ThreeD
    from core.tensor.two_d import TwoFiveD

    q = tp_grid(name, mesh.size("tp"), depth)
    if name == "1d":
        return OneD(mesh.axis("tp"))
    if name == "3d":
        return ThreeD(mesh, q)
    return TwoFiveD(mesh, q, depth if name == "2.5d" else 1)
