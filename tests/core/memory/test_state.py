"""The tensor state machine: the table's moves pass, every other move raises."""

import pytest
import torch
from torch import nn

from core.memory.chunk import Chunk
from core.memory.state import LEGAL, IllegalTransition, TensorState, move

S = TensorState


def test_every_legal_move_passes_and_every_other_raises():
    for current in S:
        for new in S:
            if new is current or new in LEGAL[current]:
                assert move(current, new) is new
            else:
                with pytest.raises(IllegalTransition, match=f"{current.value} -> {new.value} is not allowed"):
                    move(current, new, "w")


def test_the_moves_a_chunk_must_never_make():
    # computing with memory that is not on the device, or reusing a reduced gradient's tensor
    for current, new in ((S.FREE, S.COMPUTE), (S.READY_FOR_REDUCE, S.COMPUTE), (S.FREE, S.HOLD_AFTER_FWD)):
        with pytest.raises(IllegalTransition):
            move(current, new)


def test_a_chunk_in_use_cannot_leave_the_device():
    chunk = Chunk(0, 64, torch.float32, torch.device("cpu"))
    weight = nn.Parameter(torch.randn(4, 8))
    info = chunk.append("w", weight)
    chunk.payload[:32].copy_(torch.arange(32.0))
    assert torch.equal(weight.detach().reshape(-1), torch.arange(32.0))   # the parameter is a view
    chunk.set_state(info, S.COMPUTE)
    with pytest.raises(IllegalTransition, match="cannot leave the device: \\['w'\\]"):
        chunk.free_payload()
    chunk.set_state(info, S.HOLD_AFTER_FWD)
    chunk.free_payload()
    assert info.state is S.FREE and weight.untyped_storage().nbytes() == 0 and weight.shape == (4, 8)
    with pytest.raises(IllegalTransition):
        chunk.set_state(info, S.COMPUTE)
    chunk.alloc_payload()
    assert info.state is S.HOLD and weight.untyped_storage().nbytes() == 64 * 4
