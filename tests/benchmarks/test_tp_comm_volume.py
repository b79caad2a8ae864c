"""The benchmark's model at scale covers every mode and size, and shows what the modes are for.
(That the cost model equals the counted collectives of a real training step in every mode is
checked in tests.core.tensor.test_gpt_tensor_parallel.py, in the ranks that check each mode's parity.)"""

from benchmarks.tp_comm_volume import modelled_lines


def test_model_at_scale_covers_every_mode_and_size():
    lines = modelled_lines()
    fits = {(line["mode"], line["p"]) for line in lines if line["fits"]}
    assert fits == {(m, p) for m in ("1d", "2.5d", "3d") for p in (8, 64, 512, 4096)} | {("2d", 64), ("2d", 4096)}
    by = {(line["mode"], line["p"]): line for line in lines if line["fits"]}
    # the point of the higher-dimensional modes: per-device volume falls with p where 1D's does not
    for mode in ("2.5d", "3d"):
        assert by[(mode, 4096)]["wire_gib"] < by[(mode, 64)]["wire_gib"] < by[("1d", 64)]["wire_gib"]
    assert by[("1d", 4096)]["wire_gib"] >= by[("1d", 8)]["wire_gib"]
