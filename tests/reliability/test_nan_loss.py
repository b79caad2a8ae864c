"""A NaN loss stops the run with one line and status 2 before anything computed from it is saved;
the last good checkpoint resumes to the unbroken run's weights."""

import re

import torch
from safetensors.torch import load_file

from benchmarks.reliability import checkpoints_state, final_weights, losses, resumed_from, same_weights


def test_a_nan_loss_stops_the_run_and_the_last_good_checkpoint_resumes(app, unbroken, tmp_path):
    out = tmp_path / "run"
    # step 5's loss is NaN; metrics every 4 steps, so the check cannot wait for the next log line
    # (step 8): the checkpoint of step 6 would already hold NaN weights
    r = app.run(out, "train.log_every=4", entry="tests.reliability.inject", env=app.env(RELIABILITY_NAN_AT="5"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = r.error_lines()
    assert len(errors) == 1 and re.match(r"error: the loss became nan at step 5\b", errors[0]), r.stderr[-3000:]
    assert "train.resume=latest" in errors[0]
    state = checkpoints_state(out)
    assert sorted(state) == [2, 4] and not any(state.values()), state
    for step in state:
        weights = load_file(out / "checkpoints" / f"step_{step:07d}" / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), step

    resumed = app.run(out, "train.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed.stderr) == 4
    assert same_weights(final_weights(out), unbroken.weights)
    assert [x for x in losses(out) if x[0] > 4] == [x for x in unbroken.losses if x[0] > 4]
