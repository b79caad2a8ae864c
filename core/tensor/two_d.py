"""2D and 2.5D tensor parallelism: SUMMA on a q x q grid (Xu et al. 2021, "An Efficient 2D Method
for Training Super-Large Deep Learning Models", arXiv 2104.05343, "Optimus") and its extension
to d layers of such grids (Wang et al. 2021, "2.5-dimensional distributed model training",
arXiv 2105.14500, "Tesseract"). 2D is the case d = 1.

Rank (l, i, j) (depth l, row i, column j; tp rank (l q + i) q + j) holds:

- of every activation in the residual stream, batch part l q + i of d q and feature part j of q;
- of a Linear's weight W (out, in), block (output part i, input part j), the same on every
  depth layer (Tesseract's replication of the weight over d);
- of biases and feature vectors, feature part j.

A Linear y = x W^T is SUMMA with its q broadcast steps fused into one collective per operand:
the weight's column of blocks is all-gathered over the grid column (the q ranks with the same j),
each rank multiplies its activation block by it, giving partial sums of every output feature for
its tokens, and a reduce-scatter over the grid row hands output part j to rank (l, i, j). The
output has the input's layout, so Linears chain without reshuffling. In backward the adjoints
run: the output gradient is all-gathered over the row, the weight gradient reduce-scattered over
the column, and (d > 1) all-reduced over depth. Each rank holds 1/(d q^2) of every activation and
1/q^2 of every weight; it talks to q or d ranks, never to all p.

Peak memory note: fusing SUMMA's q steps holds one whole weight column (q blocks) and one partial
output (q blocks) for the duration of a Linear, instead of one block at a time.
"""

from __future__ import annotations

import torch.nn.functional as F

from core.distributed.comm import all_gather, reduce_scatter
from core.tensor.functional import copy_to
from core.tensor.modes import (ParamKind, TPMode, VocabParallelCrossEntropy, grouped_index, masked_lookup,
                               rms_norm, split_index, split_layer_norm,
                               token_split_loss)


class TwoFiveD(TPMode):
    split_activations = True

    def __init__(self, mesh, q: int, depth: int = 1) -> None:
        super().__init__(mesh.axis("tp"))
        self.q, self.d = q, depth
        self.name = "2d" if depth == 1 else "2.5d"
        self.batch_parts = depth * q
        groups = mesh.split_axis("tp", (depth, q, q), {"row": (2,), "col": (1,), "dep": (0,), "rep": (0, 1)})
        self.row, self.col, self.dep, self.rep = groups["row"], groups["col"], groups["dep"], groups["rep"]
        self.l, self.i, self.j = self.coords(self.rank)

    def coords(self, rank: int) -> tuple[int, int, int]:
        return rank // (self.q * self.q), rank // self.q % self.q, rank % self.q

    def describe(self) -> str:
        grid = f"{self.q} x {self.q}" + (f" x {self.d}" if self.d > 1 else "")
        return f"{self.name} on a {grid} grid"

    @property
    def head_parts(self) -> int:
        return self.q

    def divisor(self, what):
        return self.q

    def param_index(self, kind: ParamKind, shape, rank):
        _, i, j = self.coords(rank)
        if kind.what == "weight":
            return grouped_index(shape[0], kind.groups, self.q, i), split_index(shape[1], self.q, j)
        if kind.what == "bias":
            return (grouped_index(shape[0], kind.groups, self.q, j),)
        return (None,) * (len(shape) - 1) + (split_index(shape[-1], self.q, j),)

    def activation_index(self, role, batch, features, groups, rank):
        l, i, j = self.coords(rank)
        return split_index(batch, self.d * self.q, l * self.q + i), grouped_index(features, groups, self.q, j)

    def feature_parts(self, role):
        return self.q

    def linear(self, x, weight, bias, role):
        column = all_gather(copy_to(weight, self.dep), self.col, 0)      # (out, in / q)
        y = reduce_scatter(F.linear(x, column), self.row, -1)            # this rank's output part
        return y if bias is None else y + copy_to(bias, self.rep)

    def embedding(self, ids, weight):
        # rank (l, i, j) looks up its depth layer's tokens in vocabulary part i, features j; the
        # sum over the vocabulary parts, split by tokens, is a reduce-scatter over the column
        ids = ids.chunk(self.d, dim=0)[self.l]
        partial = masked_lookup(ids, copy_to(weight, self.dep), self.i * weight.shape[0])
        return reduce_scatter(partial, self.col, 0)

    def layer_norm(self, x, weight, bias, eps):
        width = x.shape[-1] * self.q
        return split_layer_norm(x, self.features(weight), None if bias is None else self.features(bias),
                                eps, self.row, width)

    def rms_norm(self, x, weight, eps):
        return rms_norm(x, self.features(weight), eps, self.row, x.shape[-1] * self.q)

    def features(self, param):
        return copy_to(param, self.rep)

    def cross_entropy(self, logits, target):
        target = self.local_batch(target)
        mean = VocabParallelCrossEntropy.apply(logits, target, self.row, self.j * logits.shape[-1])
        return token_split_loss(mean, self.batch_parts, self.rep)
