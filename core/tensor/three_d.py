"""3D tensor parallelism on a q x q x q cube (Bian et al. 2021, "Maximizing Parallelism in
Distributed Training for Huge Neural Networks", arXiv 2105.14450).

Rank (a, b, c) (tp rank (a q + b) q + c). Activations alternate between two layouts:

- the residual stream ("in", the input of a column Linear): batch part a q + c of q^2, feature
  part b of q;
- the output of a column Linear ("out", the input of a row Linear): batch part a q + b, feature
  part c.

A column Linear y = x W^T: the activation is all-gathered over c (batch part a), the weight
block (output part c, input part b, of which this rank holds slice a of the output rows) over a;
each rank multiplies, giving partial sums over input part b, and a reduce-scatter over b along
the batch leaves batch part a q + b, features c. A row Linear is the same with b and c exchanged,
which brings the activation back to the residual layout. Each rank holds 1/q^3 of every weight
and activation and talks to q ranks per collective. Biases and feature vectors are split q ways
and replicated over the q^2 ranks that hold the other tokens; LayerNorm all-reduces its two
statistics over b.
"""

from __future__ import annotations

import torch.nn.functional as F

from core.distributed.comm import all_gather, reduce_scatter
from core.tensor.functional import copy_to
from core.tensor.modes import (COLUMN, ParamKind, TPMode, VocabParallelCrossEntropy, grouped_index,
                               masked_lookup, rms_norm, split_index, split_layer_norm, sub_index, token_split_loss)


class ThreeD(TPMode):
    name = "3d"
    split_activations = True

    def __init__(self, mesh, q: int) -> None:
        super().__init__(mesh.axis("tp"))
        self.q = q
        self.batch_parts = q * q
        g = mesh.split_axis("tp", (q, q, q), {"a": (0,), "b": (1,), "c": (2,), "ac": (0, 2), "ab": (0, 1)})
        self.A, self.B, self.C, self.AC, self.AB = g["a"], g["b"], g["c"], g["ac"], g["ab"]
        self.a, self.b, self.c = self.coords(self.rank)

    def coords(self, rank: int) -> tuple[int, int, int]:
        q = self.q
        return rank // (q * q), rank // q % q, rank % q

    def describe(self) -> str:
        return f"3d on a {self.q} x {self.q} x {self.q} cube"

    @property
    def head_parts(self) -> int:
        return self.q

    def divisor(self, what):
        return self.q * self.q          # weights' output rows split over c, then a

    def param_index(self, kind: ParamKind, shape, rank):
        a, b, c = self.coords(rank)
        out_part, in_part = (c, b) if kind.role == COLUMN else (b, c)
        if kind.what == "weight":
            rows = sub_index(grouped_index(shape[0], kind.groups, self.q, out_part), self.q, a)
            return rows, split_index(shape[1], self.q, in_part)
        if kind.what == "bias":
            return (grouped_index(shape[0], kind.groups, self.q, out_part),)
        return (None,) * (len(shape) - 1) + (split_index(shape[-1], self.q, b),)

    def activation_index(self, role, batch, features, groups, rank):
        a, b, c = self.coords(rank)
        token_part, feature_part = (b, c) if role == COLUMN else (c, b)
        return (split_index(batch, self.q * self.q, a * self.q + token_part),
                grouped_index(features, groups, self.q, feature_part))

    def feature_parts(self, role):
        return self.q

    def linear(self, x, weight, bias, role):
        tokens_in, contract, replicas = (self.C, self.B, self.AB) if role == COLUMN else (self.B, self.C, self.AC)
        x = all_gather(x, tokens_in, 0)                       # batch part a
        w = all_gather(weight, self.A, 0)                     # this rank's whole weight block
        y = reduce_scatter(F.linear(x, w), contract, 0)       # summed over the input part, split by batch
        return y if bias is None else y + copy_to(bias, replicas)

    def embedding(self, ids, weight):
        # rows [lo, lo + rows) of the vocabulary for features b; the sum over the q^2 vocabulary
        # slices (ranks of the a-c plane), split by batch, is one reduce-scatter over that plane
        lo = (self.c * self.q + self.a) * weight.shape[0]
        return reduce_scatter(masked_lookup(ids, weight, lo), self.AC, 0)

    def layer_norm(self, x, weight, bias, eps):
        return split_layer_norm(x, self.features(weight), None if bias is None else self.features(bias),
                                eps, self.B, x.shape[-1] * self.q)

    def rms_norm(self, x, weight, eps):
        return rms_norm(x, self.features(weight), eps, self.B, x.shape[-1] * self.q)

    def features(self, param):
        return copy_to(param, self.AC)

    def cross_entropy(self, logits, target):
        target = self.local_batch(target, COLUMN)
        mean = VocabParallelCrossEntropy.apply(logits, target, self.C, self.c * logits.shape[-1])
        return token_split_loss(mean, self.batch_parts, self.AB)
