"""A disk that fills up during a save: one line, status 2, no partial folder, and the previous
checkpoint still resumes to the unbroken run's end. The full app on a real full disk (a small
tmpfs, as tests/core/test_trainer.py's test_a_real_full_disk does for the trainer alone), or,
where mounting needs rights this process lacks, on writes that fail with ENOSPC."""

import contextlib
import os
import shutil
import subprocess

from benchmarks.reliability import checkpoints_state, final_weights, in_flight_saves, losses, resumed_from, same_weights


@contextlib.contextmanager
def small_disk(path, size_bytes):
    """A tmpfs of `size_bytes` at `path`; yields False (and mounts nothing) without the rights."""
    path.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=False)


def _bytes(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(app, unbroken, tmp_path):
    one = _bytes(unbroken.out / "checkpoints" / "step_0000008")
    disk = tmp_path / "disk"
    with small_disk(disk, int(one * 1.5)) as real:   # room for one checkpoint, not two
        out = disk / "run"
        if real:
            r = app.run(out)
        else:
            r = app.run(out, entry="tests.reliability.inject",
                        env=app.env(RELIABILITY_ENOSPC="step_0000004/optimizer.pt"))
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr
        errors = r.error_lines()
        assert len(errors) == 1 and errors[0].startswith("error: the disk is full while writing checkpoint"), r.stderr
        assert "step_0000004" in errors[0] and "train.resume=latest" in errors[0]
        state = checkpoints_state(out)
        assert sorted(state) == [2] and not any(state.values()), state
        assert not in_flight_saves(out)
        moved = tmp_path / "elsewhere"          # "point output.dir elsewhere"
        shutil.copytree(out, moved)
    resumed = app.run(moved, "train.resume=latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed.stderr) == 2
    assert losses(moved) == unbroken.losses
    assert same_weights(final_weights(moved), unbroken.weights)
