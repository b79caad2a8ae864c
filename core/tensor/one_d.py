"""1D tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", section 3).

A column-parallel Linear splits its output features (its input replicated: identity forward,
all-reduce of the input gradient backward); a row-parallel Linear splits its input features and
all-reduces its output in forward. A column/row pair (attention's qkv/proj, the MLP's fc/proj)
costs one all-reduce forward and one backward. The embedding and the classifier split the
vocabulary. Everything outside the pairs (LayerNorm, residual stream) is replicated and costs
nothing.
"""

from __future__ import annotations

import torch.nn.functional as F

from core.tensor.functional import copy_to, reduce_from
from core.tensor.modes import (COLUMN, ParamKind, TPMode, VocabParallelCrossEntropy, grouped_index,
                               masked_lookup, rms_norm, split_index)


class OneD(TPMode):
    name = "1d"

    @classmethod
    def serial(cls) -> "OneD":
        """The mode on one rank: every layer computes exactly what its torch.nn counterpart does."""
        from core.distributed.comm import AxisGroup

        return cls(AxisGroup("tp", 1, 0, (0,)))

    @property
    def head_parts(self) -> int:
        return self.size

    def divisor(self, what):
        return self.size if what == "vocab" else 1

    @staticmethod
    def leaves_whole(kind: ParamKind) -> bool:
        """Whether every rank holds a parameter of this kind whole: a feature parameter (LayerNorm
        scales, a position table) or a row Linear's bias (added after the all-reduce)."""
        return kind.what == "features" or (kind.what == "bias" and kind.role != COLUMN)

    def param_index(self, kind: ParamKind, shape, rank):
        if self.leaves_whole(kind):
            return (None,) * len(shape)
        p = self.size
        if kind.what == "weight":
            if kind.role == COLUMN:
                return grouped_index(shape[0], kind.groups, p, rank), None
            return None, split_index(shape[1], p, rank)
        return (grouped_index(shape[0], kind.groups, p, rank),)     # a column Linear's bias

    def activation_index(self, role, batch, features, groups, rank):
        return None, (grouped_index(features, groups, self.size, rank) if role == COLUMN else None)

    def feature_parts(self, role):
        return self.size if role == COLUMN else 1

    def linear(self, x, weight, bias, role):
        if role == COLUMN:
            return F.linear(copy_to(x, self.axis), weight, bias)
        y = reduce_from(F.linear(x, weight), self.axis)
        return y if bias is None else y + bias

    def embedding(self, ids, weight):
        if self.size == 1:
            return F.embedding(ids, weight)
        return reduce_from(masked_lookup(ids, weight, self.rank * weight.shape[0]), self.axis)

    def layer_norm(self, x, weight, bias, eps):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def rms_norm(self, x, weight, eps):
        return rms_norm(x, weight, eps)

    def features(self, param):
        return param

    def cross_entropy(self, logits, target):
        if self.size == 1:
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        return VocabParallelCrossEntropy.apply(logits, target, self.axis, self.rank * logits.shape[-1])
