"""What one transformer layer's forward and backward communicate, per tensor-parallel rank, in
each mode: the one place the auto-parallel planner and the benchmarks read it from.

Two figures per layer: the payload (the bytes handed to the collectives, which is what
`core.distributed`'s counters measure) and the wire bytes a rank sends with ring algorithms
(all-reduce 2 (p-1)/p of the payload, all-gather and reduce-scatter (p-1)/p of the output).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerComm:
    calls: int           # collective calls per rank
    payload_bytes: int   # bytes handed to them per rank
    wire_bytes: float    # bytes a rank sends, ring algorithms

    def __add__(self, other: "LayerComm") -> "LayerComm":
        return LayerComm(self.calls + other.calls, self.payload_bytes + other.payload_bytes,
                         self.wire_bytes + other.wire_bytes)


def transformer_layer(mode: str, p: int, batch: int, seq: int, hidden: int, dtype_bytes: int = 4) -> LayerComm:
    """One layer (attention block and MLP block), forward and backward, per rank."""
    if p == 1:
        return LayerComm(0, 0, 0.0)
    activation = batch * seq * hidden * dtype_bytes
    if mode == "1d":
        # each of the two column/row pairs: one all-reduce of the (b, s, h) output in forward, one
        # of the (b, s, h) input gradient in backward (Megatron-LM, section 3)
        calls = 4
        return LayerComm(calls, calls * activation, calls * 2 * (p - 1) / p * activation)
    raise NotImplementedError(f"the cost model has no '{mode}' mode yet")
