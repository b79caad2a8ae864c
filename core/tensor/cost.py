"""What one transformer layer's forward and backward communicate, per tensor-parallel rank, in
each mode: the one place the auto-parallel planner and the benchmarks read it from.

Every figure mirrors the collectives the modes in `core.tensor` issue, op by op. Two figures per
collective: the payload (the bytes handed to it, which is what `core.distributed`'s counters
measure: the input of an all-reduce, the local part of an all-gather, the whole input of a
reduce-scatter) and the wire bytes a rank sends with ring algorithms (all-reduce 2 (k-1)/k of the
payload, all-gather (k-1) times it, reduce-scatter (k-1)/k of it, over a group of k ranks).

The layer is GPT's: LayerNorm, qkv (h -> 3h), attention, projection (h -> h), LayerNorm, fc
(h -> 4h), projection (4h -> h), biases optional; `batch` x `seq` tokens of width `hidden`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerComm:
    calls: int           # collective calls per rank
    payload_bytes: float  # bytes handed to them per rank
    wire_bytes: float    # bytes a rank sends, ring algorithms

    def __add__(self, other: "LayerComm") -> "LayerComm":
        return LayerComm(self.calls + other.calls, self.payload_bytes + other.payload_bytes,
                         self.wire_bytes + other.wire_bytes)

    def __mul__(self, n: int) -> "LayerComm":
        return LayerComm(self.calls * n, self.payload_bytes * n, self.wire_bytes * n)


NONE = LayerComm(0, 0, 0.0)
_WIRE = {"all_reduce": lambda k: 2 * (k - 1) / k, "all_gather": lambda k: k - 1,
         "reduce_scatter": lambda k: (k - 1) / k}


def _op(op: str, k: int, elements: float, e: int) -> LayerComm:
    """One collective over k ranks handed `elements` values of `e` bytes (nothing when k = 1)."""
    if k == 1:
        return NONE
    return LayerComm(1, elements * e, _WIRE[op](k) * elements * e)


def grid(mode: str, p: int, depth: int = 1) -> tuple[int, int]:
    """(q, d) of a mode's grid over p ranks; ValueError when p does not fit it."""
    if mode == "1d":
        return p, 1
    if mode in ("2d", "2.5d"):
        d = 1 if mode == "2d" else depth
        q = math.isqrt(p // d) if p % d == 0 else 0
        if q * q * d != p or q == 0:
            raise ValueError(f"{mode} needs p = q x q x {d}; {p} is not one")
        return q, d
    if mode == "3d":
        q = round(p ** (1 / 3))
        if q ** 3 != p:
            raise ValueError(f"3d needs p = q x q x q; {p} is not one")
        return q, 1
    raise ValueError(f"unknown mode {mode!r}")


def feature_parts(mode: str, p: int, depth: int = 1) -> int:
    """Into how many parts a mode over p ranks splits the parameters 1D leaves whole (feature
    parameters, a row Linear's bias; `OneD.leaves_whole`): none under 1D, the grid's q otherwise."""
    return 1 if mode == "1d" or p == 1 else grid(mode, p, depth)[0]


def _linear(mode: str, q: int, d: int, n: int, fan_in: int, fan_out: int, bias: bool, e: int) -> LayerComm:
    """A Linear's forward and backward on n tokens (the whole batch x seq)."""
    if mode in ("2d", "2.5d"):
        local = n / (d * q)
        cost = (_op("all_gather", q, fan_out * fan_in / q ** 2, e)        # weight column, forward
                + _op("reduce_scatter", q, local * fan_out, e)            # partial outputs over the row
                + _op("reduce_scatter", q, fan_out * fan_in / q, e)       # weight gradient over the column
                + _op("all_gather", q, local * fan_out / q, e)            # output gradient over the row
                + _op("all_reduce", d, fan_out * fan_in / q ** 2, e))     # weight gradient over depth
        return cost + (_op("all_reduce", d * q, fan_out / q, e) if bias else NONE)
    if mode == "3d":
        local = n / q ** 2
        cost = (_op("all_gather", q, local * fan_in / q, e)               # input, forward
                + _op("all_gather", q, fan_out * fan_in / q ** 3, e)      # weight block, forward
                + _op("reduce_scatter", q, n / q * fan_out / q, e)        # partial outputs
                + _op("reduce_scatter", q, n / q * fan_in / q, e)         # input gradient
                + _op("reduce_scatter", q, fan_out * fan_in / q ** 2, e)  # weight gradient
                + _op("all_gather", q, local * fan_out / q, e))           # output gradient
        return cost + (_op("all_reduce", q * q, fan_out / q, e) if bias else NONE)
    raise ValueError(mode)


def _layer_norm(mode: str, q: int, d: int, n: int, hidden: int, bias: bool, e: int) -> LayerComm:
    """Two statistics all-reduced forward and again backward; the scale (and shift) gradients
    summed over the ranks holding the other tokens."""
    tokens = n / (d * q) if mode != "3d" else n / q ** 2
    replicas = d * q if mode != "3d" else q * q
    return (_op("all_reduce", q, tokens, e) * 4
            + _op("all_reduce", replicas, hidden / q, e) * (2 if bias else 1))


def transformer_layer(mode: str, p: int, batch: int, seq: int, hidden: int, dtype_bytes: int = 4,
                      depth: int = 1, bias: bool = True) -> LayerComm:
    """One layer (attention block and MLP block), forward and backward, per rank."""
    if p == 1:
        return NONE
    q, d = grid(mode, p, depth)
    n, e = batch * seq, dtype_bytes
    if mode == "1d":
        # each of the two column/row pairs: one all-reduce of the (b, s, h) output in forward, one
        # of the (b, s, h) input gradient in backward (Megatron-LM, section 3)
        return _op("all_reduce", p, n * hidden, e) * 4
    linears = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)]
    cost = _layer_norm(mode, q, d, n, hidden, bias, e) * 2
    for fan_in, fan_out in linears:
        cost = cost + _linear(mode, q, d, n, fan_in, fan_out, bias, e)
    return cost

