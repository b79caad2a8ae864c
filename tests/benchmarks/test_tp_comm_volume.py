"""The cost model predicts, call for call and byte for byte, what one GPT block's forward and
backward hand to the collectives in every tensor-parallel mode (counted on gloo ranks)."""

import pytest

from benchmarks.tp_comm_volume import measure_layer, modelled_lines
from core.distributed.testing import run_distributed
from core.tensor.cost import transformer_layer

CASES = [("1d", 2, 1, True), ("2d", 4, 1, False), ("2.5d", 8, 2, True), ("3d", 8, 1, True)]


@pytest.mark.parametrize("mode,tp,depth,bias", CASES, ids=[f"{m}-tp{t}-bias{b}" for m, t, _, b in CASES])
def test_cost_model_equals_the_counted_collectives(mode, tp, depth, bias):
    batch, seq, hidden, heads = 4, 8, 16, 4
    predicted = transformer_layer(mode, tp, batch, seq, hidden, 4, depth, bias)
    for got in run_distributed(measure_layer, world_size=tp, args=(mode, tp, depth, batch, seq, hidden, heads, bias)):
        assert (got["calls"], got["bytes"]) == (predicted.calls, predicted.payload_bytes), got["by_axis"]


def test_model_at_scale_covers_every_mode_and_size():
    lines = modelled_lines()
    fits = {(line["mode"], line["p"]) for line in lines if line["fits"]}
    assert fits == {(m, p) for m in ("1d", "2.5d", "3d") for p in (8, 64, 512, 4096)} | {("2d", 64), ("2d", 4096)}
    by = {(line["mode"], line["p"]): line for line in lines if line["fits"]}
    # the point of the higher-dimensional modes: per-device volume falls with p where 1D's does not
    for mode in ("2.5d", "3d"):
        assert by[(mode, 4096)]["wire_gib"] < by[(mode, 64)]["wire_gib"] < by[("1d", 64)]["wire_gib"]
    assert by[("1d", 4096)]["wire_gib"] >= by[("1d", 8)]["wire_gib"]
