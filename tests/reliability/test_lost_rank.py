"""A rank that dies mid-step: the others stop at once (no waiting for parallel.timeout_s) with one
line that names it, status 3, and a restart with train.resume=latest ends like the unbroken run."""

import os
import re
import signal
import threading
import time

import pytest
from torch.distributed import TCPStore

from benchmarks.reliability import REPO, Result, final_weights, losses, resumed_from, same_weights
from core.distributed import failure
from core.distributed.testing import Module, free_port

LOST = re.compile(r"error: rank 1 of 2 stopped \(.+\); .*restart the job with train\.resume=latest$")


def test_a_rank_killed_mid_step_under_torchrun(app_dp2, unbroken_dp2, tmp_path):
    out = tmp_path / "run"
    r = app_dp2.run(out, kill_at="train.step:3", kill_rank=1, timeout=180)
    ended = time.time()
    assert r.returncode != 0
    # the surviving rank's line; torchrun's own report below it quotes the line as rank 0's traceback
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and LOST.match(lines[0]), r.stderr[-4000:]
    assert "traceback : error: rank 1 of 2 stopped" in r.stderr
    assert re.search(r"rank +: 1 \(local_rank: 1\)\n +exitcode +: -9", r.stderr), r.stderr[-3000:]
    assert re.search(r"rank +: 0 \(local_rank: 0\)\n +exitcode +: 3 ", r.stderr), r.stderr[-3000:]
    assert "[rank0]" not in r.stderr          # no traceback from the surviving rank
    # the last checkpoint (step 2) was written just before the kill (after step 3)
    last = (out / "checkpoints" / "step_0000002" / "meta.json").stat().st_mtime
    assert ended - last < 30, "the surviving rank waited for parallel.timeout_s"

    resumed = app_dp2.run(out, "train.resume=latest", timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed_from(resumed.stderr) == 2
    assert losses(out) == unbroken_dp2.losses
    assert same_weights(final_weights(out), unbroken_dp2.weights)


def _two_ranks(app_dp2, out, killed_rank):
    """Both ranks of a dp=2 run started by hand (RANK, WORLD_SIZE, MASTER_*), no launcher: each its own
    process (forked from the harness's forkserver, which imported torch already)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = app_dp2.env("train.step:3", killed_rank, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append((time.perf_counter(), Module("apps.gpt.pretrain", app_dp2.overrides(out), env, cwd=REPO)))
    results = []
    for t0, p in procs:
        done = p.wait(timeout=180)
        results.append(Result(done.returncode, done.stderr, time.perf_counter() - t0))
    return results


@pytest.mark.parametrize("killed", [1, 0])
def test_a_lost_rank_without_a_launcher(app_dp2, tmp_path, killed):
    """Rank 0 hosts the job's store here: when it is the one lost, rank 1 says so."""
    results = _two_ranks(app_dp2, tmp_path / "run", killed)
    survivor = results[1 - killed]
    assert results[killed].killed
    assert survivor.returncode == failure.PEER_LOST, survivor.stderr[-3000:]
    assert "Traceback" not in survivor.stderr
    lines = survivor.error_lines()
    assert len(lines) == 1, survivor.stderr
    if killed == 1:
        assert LOST.match(lines[0]) and "rank 0 saw: " in lines[0], lines
    else:
        assert lines[0].startswith("error: rank 0 of 2 stopped (it hosted the job's store at 127.0.0.1:"), lines
    assert survivor.seconds < results[killed].seconds + 30


# ------------------------------------------------------------------ the roll call on its own

def _agent_env(port, rank, world):
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "test", "TORCHELASTIC_RESTART_COUNT": "0"}


def _in_threads(calls):
    out = [None] * len(calls)

    def run(i, fn):
        out[i] = fn()

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_the_roll_call_names_the_rank_that_never_answers():
    port = free_port()
    agent = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)   # torchrun's, in effect
    closed = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                          "[127.0.0.1]:4242. This is typically caused by a remote worker crashing.")
    t0 = time.perf_counter()
    v0, v2, v3 = _in_threads([lambda r=r: failure.roll_call(closed if r else failure.Stopped(15),
                                                            _agent_env(port, r, 4), grace_s=1.0)
                              for r in (0, 2, 3)])
    assert time.perf_counter() - t0 < 5
    assert v0.lost == v2.lost == v3.lost == [1]
    assert v0.status == v2.status == v3.status == failure.PEER_LOST
    assert v0.line is not None and v2.line is None and v3.line is None   # one line: the lowest survivor's
    assert v0.line.startswith("error: rank 1 of 4 stopped (the launcher noticed and stopped the others;")
    assert v2.message.startswith("error: rank 1 of 4 stopped (rank 2 saw: Connection closed by peer [127.0.0.1]:4242;")
    del agent


def test_a_refusal_on_one_rank_is_not_a_lost_rank():
    port = free_port()
    agent = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    refused, verdict = _in_threads([
        lambda: failure.note_refusal("data.path: /x is not a folder", _agent_env(port, 1, 2), wait_s=5),
        lambda: (time.sleep(0.3), failure.roll_call(failure.Stopped(15), _agent_env(port, 0, 2), grace_s=1.0))[1],
    ])
    assert refused is False                     # rank 0 did not refuse: rank 1 must say why itself
    assert verdict.lost == [] and verdict.status == 2
    assert verdict.line == "error: on rank 1: data.path: /x is not a folder"
    del agent


def test_what_counts_as_a_lost_peer():
    assert failure.is_peer_failure(RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out "
                                                "waiting 30000ms for recv operation to complete"))
    assert failure.is_peer_failure(failure.Stopped(15))
    wrapped = ValueError("while saving")
    wrapped.__cause__ = RuntimeError("gloo: Connection reset by peer")
    assert failure.is_peer_failure(wrapped)
    assert not failure.is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not failure.is_peer_failure(KeyError("step"))
    assert failure.ranks_text([1]) == "rank 1" and failure.ranks_text([1, 3]) == "ranks 1, 3"
    assert failure.ranks_text([0, 4, 5, 6, 7]) == "ranks 0, 4-7"


def test_sigterm_becomes_stopped_until_the_run_is_ending():
    before = signal.getsignal(signal.SIGTERM)
    with failure.SignalGuard() as guard:
        with pytest.raises(failure.Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)        # the handler runs at the next bytecode boundary
        guard.hold()             # the roll call is running: a second SIGTERM changes nothing
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) is before
