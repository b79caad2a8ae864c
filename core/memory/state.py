"""The life of a parameter inside a chunk, as a table of legal moves.

    FREE              no copy on the compute device (the chunk lives on the host or NVMe)
    HOLD              on the device, not in use: the chunk may be evicted
    COMPUTE           an operation is using it: the chunk must stay
    HOLD_AFTER_FWD    forward is done with it; backward will want it again
    HOLD_AFTER_BWD    backward is over and used it without producing a gradient (frozen)
    READY_FOR_REDUCE  its gradient is complete and can be reduced and moved to the optimizer

Every change of state goes through `move`, which raises `IllegalTransition` for a move the
table does not list: a bug in the scheduling of chunks fails loudly instead of computing with
evicted memory.
"""

from __future__ import annotations

from enum import Enum


class TensorState(Enum):
    FREE = "free"
    HOLD = "hold"
    COMPUTE = "compute"
    HOLD_AFTER_FWD = "hold_after_fwd"
    HOLD_AFTER_BWD = "hold_after_bwd"
    READY_FOR_REDUCE = "ready_for_reduce"


S = TensorState
LEGAL: dict[TensorState, frozenset[TensorState]] = {
    # a gradient may arrive for a tensor whose chunk is on the host (a bias is not saved for backward)
    S.FREE: frozenset({S.HOLD, S.READY_FOR_REDUCE}),
    S.HOLD: frozenset({S.COMPUTE, S.FREE, S.READY_FOR_REDUCE}),
    S.COMPUTE: frozenset({S.HOLD, S.HOLD_AFTER_FWD, S.HOLD_AFTER_BWD, S.READY_FOR_REDUCE}),
    S.HOLD_AFTER_FWD: frozenset({S.COMPUTE, S.HOLD, S.FREE, S.READY_FOR_REDUCE}),
    S.HOLD_AFTER_BWD: frozenset({S.COMPUTE, S.READY_FOR_REDUCE, S.HOLD, S.FREE}),
    S.READY_FOR_REDUCE: frozenset({S.HOLD, S.FREE}),
}
# States in which the tensor's memory may leave the device.
EVICTABLE = frozenset({S.HOLD, S.HOLD_AFTER_FWD, S.HOLD_AFTER_BWD, S.READY_FOR_REDUCE})


class IllegalTransition(RuntimeError):
    pass


def move(current: TensorState, new: TensorState, what: str = "tensor") -> TensorState:
    """`new`, if the table allows `current -> new`; otherwise IllegalTransition."""
    if new is current:
        return new
    if new not in LEGAL[current]:
        allowed = ", ".join(sorted(s.value for s in LEGAL[current]))
        raise IllegalTransition(f"{what}: {current.value} -> {new.value} is not allowed (from "
                                f"{current.value}: {allowed})")
    return new
