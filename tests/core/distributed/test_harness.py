"""The test harness reports a failing rank's traceback and a hanging rank; `Module` runs a command
as `python -m` does."""

import pytest
import torch
import torch.distributed as dist

import signal
import sys

from core.distributed.testing import Module, RankTimeout, run_distributed, run_module


def _rank_one_fails():
    if dist.get_rank() == 1:
        raise ValueError("rank one says no")
    return dist.get_rank()


def _rank_one_fails_first_and_exits_last():
    """Rank 1 fails of its own cause but its process lingers (a slow exit); rank 0 then fails of a
    secondary error and exits first, so spawn reports rank 0's error alone."""
    import multiprocessing.util
    import time
    if dist.get_rank() == 1:
        multiprocessing.util.Finalize(None, time.sleep, args=(5.0,), exitpriority=10)
        raise FileNotFoundError("rank one's own cause")
    time.sleep(1.5)
    raise ConnectionResetError("rank zero lost its peer")


def _rank_one_never_joins():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))
    else:
        import time
        time.sleep(60)


def _rank_and_world():
    return dist.get_rank(), dist.get_world_size()


def test_results_come_back_in_rank_order():
    assert run_distributed(_rank_and_world, world_size=2) == [(0, 2), (1, 2)]


def test_failing_rank_fails_the_call_with_its_traceback():
    with pytest.raises(Exception) as e:
        run_distributed(_rank_one_fails, world_size=2)
    text = str(e.value)
    assert "rank one says no" in text and "ValueError" in text and "_rank_one_fails" in text


def test_every_failing_rank_is_reported():
    with pytest.raises(Exception) as e:
        run_distributed(_rank_one_fails_first_and_exits_last, world_size=2)
    assert "rank zero lost its peer" in str(e.value) and "rank one's own cause" in str(e.value)


def test_hanging_rank_is_killed_and_reported():
    with pytest.raises(RankTimeout, match=r"ranks \[.*\] of 2 still running"):
        run_distributed(_rank_one_never_joins, world_size=2, timeout=6)


PROBE = """
import os, sys, time
print("argv", sys.argv[1:], "env", os.environ.get("PROBE"), "cwd", os.getcwd())
print("to stderr", file=sys.stderr)
if sys.argv[1] == "sleep":
    time.sleep(60)
sys.exit(int(sys.argv[1]))
"""


def test_a_module_runs_as_python_m_runs_it(tmp_path):
    (tmp_path / "loom_probe.py").write_text(PROBE)
    env = {"PROBE": "seen", "PATH": "/usr/bin"}
    done = run_module("loom_probe", ["3"], env, cwd=tmp_path)
    assert done.returncode == 3
    assert done.args == [sys.executable, "-m", "loom_probe", "3"]
    assert done.stdout == f"argv ['3'] env seen cwd {tmp_path}\n"
    assert done.stderr == "to stderr\n"
    # two at once; one killed, as a SIGKILLed process reports it
    sleeper, quick = Module("loom_probe", ["sleep"], env, cwd=tmp_path), Module("loom_probe", ["0"], env, cwd=tmp_path)
    assert sleeper.wait(timeout=30, kill_after_s=1.0).returncode == -signal.SIGKILL
    assert quick.wait(timeout=30).returncode == 0
