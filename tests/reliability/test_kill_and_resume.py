"""A run SIGKILLed at any step of a checkpoint save, or between optimizer steps, and resumed with
train.resume=latest ends exactly where the unbroken run ends; no kill leaves a checkpoint that
resume=latest could load wrongly."""

import shutil

from benchmarks.reliability import checkpoints_state, final_weights, in_flight_saves, losses, resumed_from, same_weights

# One run directory, killed once per line (the count is per process: the n-th time that process
# passes the point), then resumed until it completes. Saves happen at steps 2, 4, 6, 8.
CHAIN = [
    ("checkpoint.begin", 2, 2),             # inside the save of step 4: step 2 is what is left
    ("checkpoint.parts_written", 1, 2),     # resumed at 2; the save of 4 dies with its files written
    ("checkpoint.manifest_written", 2, 4),  # 4 is saved; the save of 6 dies with its manifest written
    ("checkpoint.synced", 1, 4),            # resumed at 4; 6 dies flushed but not renamed into place
    ("checkpoint.published", 1, 6),         # 6 is in place; dies before anything else happens
    ("train.step", 1, 6),                   # resumed at 6; dies right after the optimizer step 7
]
# (a background save's kill point: test_background_save.py)


def test_killed_at_every_point_then_resumed_ends_bit_for_bit_like_the_unbroken_run(app, unbroken, tmp_path):
    out = tmp_path / "run"
    newest = None
    for i, (point, count, left) in enumerate(CHAIN):
        r = app.run(out, *(["train.resume=latest"] if i else []), kill_at=f"{point}:{count}")
        assert r.killed, f"{point}:{count} did not kill the run (exit {r.returncode}):\n{r.stderr[-3000:]}"
        if i:
            assert resumed_from(r.stderr) == newest, (point, r.stderr[-3000:])
        state = checkpoints_state(out)
        assert not any(state.values()), f"after a kill at {point}: {state}"
        assert max(state) == left, (point, sorted(state), in_flight_saves(out))
        newest = left
    done = app.run(out, "train.resume=latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert resumed_from(done.stderr) == newest
    assert losses(out) == unbroken.losses                          # every step's loss, bitwise
    assert same_weights(final_weights(out), unbroken.weights)      # bitwise
    assert not in_flight_saves(out)


def test_resume_latest_passes_over_a_damaged_checkpoint(app, unbroken, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(unbroken.out, out)
    weights = out / "checkpoints" / "step_0000008" / "model.safetensors"
    with open(weights, "r+b") as f:       # a crash of the disk, not of Loom: cut the file short
        f.truncate(weights.stat().st_size // 2)
    r = app.run(out, "train.resume=latest")
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if "damaged" in line or "truncated" in line]
    assert len(said) == 1 and "step_0000008" in said[0] and "model.safetensors" in said[0], r.stderr[-3000:]
    assert resumed_from(r.stderr) == 6
    assert losses(out) == unbroken.losses
    assert same_weights(final_weights(out), unbroken.weights)
