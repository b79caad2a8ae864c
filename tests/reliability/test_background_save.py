"""A background save (`train.checkpoint_async=true`) that dies or fails half-way: the checkpoint
before it stays intact and resumes to the unbroken run's end, bit for bit. The app runs in ranks
the test harness forks (the SIGKILL of a fault point ends the rank as it ends a process)."""

import pytest
from torch.multiprocessing import ProcessExitedException

from benchmarks.reliability import checkpoints_state, final_weights, in_flight_saves, losses, same_weights
from core.distributed.testing import run_distributed

BACKGROUND = ["train.checkpoint_format=sharded", "train.checkpoint_async=true"]


def _main(argv: list[str], enospc: str = "") -> str | None:
    """Rank-side: the GPT app's main; the one-line error it stopped with, or None."""
    import contextlib
    import io

    from apps.gpt import pretrain
    from core.errors import LoomError

    if enospc:
        from tests.reliability.inject import _enospc

        _enospc(enospc)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            pretrain.main(argv)
    except LoomError as e:
        return str(e)
    return None


def test_a_crash_during_a_background_save_leaves_the_previous_checkpoint(app, unbroken, tmp_path):
    """The step-4 save's thread has written its files; the process dies before they are published:
    step 2 is what is left, intact (older checkpoints are pruned only once a newer one is in place)."""
    out = tmp_path / "run"
    env = {"LOOM_CACHE": str(app.cache), "LOOM_KILL_AT": "checkpoint.async_written:2"}
    with pytest.raises(ProcessExitedException, match="signal SIGKILL"):
        run_distributed(_main, world_size=1, args=(app.overrides(out, *BACKGROUND),), env=env)
    assert checkpoints_state(out) == {2: None}
    assert in_flight_saves(out) == [".step_0000004.partial"]
    env["LOOM_KILL_AT"] = ""
    assert run_distributed(_main, world_size=1, args=(app.overrides(out, *BACKGROUND, "train.resume=latest"),),
                           env=env) == [None]
    assert losses(out) == unbroken.losses
    assert same_weights(final_weights(out), unbroken.weights)
    assert (out / "checkpoints" / "step_0000008" / "sharded.json").is_file() and not in_flight_saves(out)


def test_a_full_disk_during_a_background_save_stops_the_run_at_the_next_checkpoint(app, tmp_path):
    """The step-4 save's thread meets a full disk (ENOSPC for its state.pt); training goes on until
    the next checkpoint, where the run stops with the message a synchronous save gives; the
    unpublished folder is gone and step 2 is intact."""
    out = tmp_path / "run"
    (error,) = run_distributed(_main, world_size=1, args=(app.overrides(out, *BACKGROUND), "step_0000004/state.pt"),
                               env={"LOOM_CACHE": str(app.cache), "LOOM_KILL_AT": ""})
    assert error is not None and error.startswith("the disk is full while writing checkpoint"), error
    assert "step_0000004" in error and "train.resume=latest" in error
    assert checkpoints_state(out) == {2: None} and not in_flight_saves(out)
