"""When a process of the job is gone: find out which one, and say so in one line.

A rank that is killed (SIGKILL, the out-of-memory killer, a lost machine) says nothing. Its
peers learn of it in one of two ways: a collective fails (gloo: "Connection closed by peer",
or a timeout after `parallel.timeout_s`), or the launcher stops them (torchrun sends SIGTERM
to every other rank of the group as soon as one exits). Neither says *which* rank is gone.

So every rank that is still alive, once it has stopped, takes a roll call in the job's
key-value store (the one the process group was built on):

1. it writes `alive/<rank>` and counts itself in `count`;
2. it waits until all ranks have answered or `GRACE_S` seconds have passed; the ranks that
   never answered are the lost ones;
3. the lowest rank that answered (as this rank sees it) claims the report with an atomic
   `add`, so exactly one line is printed for the whole job, and every survivor exits with
   `PEER_LOST` (3): "the job lost a process; restart it with train.resume=latest" (an inference
   entry point says what it kept and how to go on instead: `Aftermath`) (where
   2 means "fix the recipe or the input").

Which store: under torchrun its agent hosts one at MASTER_ADDR:MASTER_PORT that outlives the
workers; the keys carry the run id and restart count. Elsewhere (plain RANK/WORLD_SIZE
variables, Slurm) rank 0 hosted it for the process group; it may be gone with the process
group, so rank 0 hosts it again on the same port (or uses the old one if it still listens) and
marks `host` when it serves; the other ranks wait for that mark. If rank 0 itself is lost
nobody answers there: the other ranks then report "rank 0 stopped", from rank 1 only (the
lowest rank that may be alive). Under torchrun a store that does not answer means the agent
itself is gone; rank 0 reports that.

A refusal (a LoomError, exit status 2) is not a loss. Under torchrun a rank that refuses
notes it in the agent's store (`note_refusal`) and waits until every rank has either refused
or answered a roll call: torchrun stops the whole group as soon as one rank exits, and a rank
still importing torch would otherwise die of that SIGTERM instead of reaching the same refusal.
A roll call that finds refusals ends the job with status 2 and the refusal's line (printed by
rank 0, whose line torchrun also shows as the root cause of its report).

The C++ store prints its connection retries on stderr; the roll call runs with stderr sent
to /dev/null so that the one line stays one line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

import torch.distributed as dist

from core.distributed.launch import DistEnv, detect

PEER_LOST = 3          # exit status of every surviving rank when the job lost a process
TERMINATED = 143       # 128 + SIGTERM: asked to stop, nobody lost
GRACE_S = 5.0          # how long survivors wait for each other's roll call

_PEER_PHRASES = ("connection closed by peer", "connection reset by peer", "broken pipe",
                 "timed out", "timeout", "socket closed", "connection refused",
                 "no route to host", "communicator was aborted", "remote process exited",
                 "peer closed", "end of file")


class Stopped(BaseException):
    """Raised in the main thread when the process receives SIGTERM (a launcher stopping the job).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def is_peer_failure(error: BaseException) -> bool:
    """True when `error` (or what caused it) says a peer of a collective or the store is gone."""
    seen = 0
    e: BaseException | None = error
    while e is not None and seen < 8:
        if isinstance(e, Stopped):
            return True
        if isinstance(e, dist.DistError):
            return True
        if isinstance(e, RuntimeError):
            text = str(e).lower()
            if any(p in text for p in _PEER_PHRASES) and ("gloo" in text or "nccl" in text or "c10d" in text
                                                          or "peer" in text or "store" in text):
                return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def short_reason(error: BaseException) -> str:
    """The useful part of a collective's error: 'Connection closed by peer [127.0.0.1]:4242'."""
    if isinstance(error, Stopped):
        return f"{error.args[0]} from the launcher"
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    # after the innermost C++ source location: "... callback: RuntimeError: [pair.cc:537] Read error"
    located = re.split(r"\[[^\]\s]*\.(?:cc|cpp|h):\d+\]\s*", text)
    text = located[-1] or text
    text = re.split(r"\.\s+This is typically", text)[0]
    return text[:160].rstrip(". ")


def ranks_text(ranks: list[int]) -> str:
    """[1] -> 'rank 1'; [1, 3] -> 'ranks 1, 3'; [4, 5, 6, 7] -> 'ranks 4-7'."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    parts, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None]):
        if cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return "ranks " + ", ".join(parts)


@dataclass
class Verdict:
    """What the roll call found, and what this rank should do about it."""

    line: str | None          # the line to print on this rank (None: another rank prints it)
    message: str              # the same diagnosis, for this rank's torchrun error file
    status: int               # exit status
    lost: list[int]


@dataclass(frozen=True)
class Aftermath:
    """What a stopped job leaves (`kept`) and how to go on (`again`), as the entry point's lines
    say it: a training run keeps its checkpoints, an inference run the results it finished."""

    kept: str
    again: str


TRAINING = Aftermath("the checkpoints written so far are intact", "restart the job with train.resume=latest")


def _verdict(env: DistEnv, lost: list[int] | None, reporter: bool, reason: str, sigterm: bool,
             after: Aftermath = TRAINING) -> Verdict:
    world = env.world_size
    stopped = f"every rank has stopped and {after.kept}: {after.again}"
    if lost is None:   # the store did not answer
        if env.launcher == "torchrun":
            msg = (f"error: the torchrun agent is gone (its store at {env.master_addr}:{env.master_port} "
                   f"does not answer; rank {env.rank} saw: {reason}); {stopped}")
            return Verdict(msg if env.rank == 0 else None, msg, PEER_LOST, [])
        msg = (f"error: rank 0 of {world} stopped (it hosted the job's store at {env.master_addr}:{env.master_port}, "
               f"which does not answer; rank {env.rank} saw: {reason}); {stopped}")
        return Verdict(msg if env.rank == 1 else None, msg, PEER_LOST, [0])
    if lost:
        msg = (f"error: {ranks_text(lost)} of {world} stopped "
               f"({'the launcher noticed and stopped the others' if sigterm else f'rank {env.rank} saw: {reason}'}; "
               f"the lost rank's own output may say why); {stopped}")
        return Verdict(msg if reporter else None, msg, PEER_LOST, lost)
    if sigterm:
        msg = f"stopped by SIGTERM (every rank was asked to stop); {after.kept}: {after.again}"
        return Verdict(msg if reporter else None, msg, TERMINATED, [])
    msg = (f"error: a collective failed although all {world} ranks are alive (rank {env.rank} saw: {reason}); "
           f"check that parallel.timeout_s is long enough for the slowest step, then {after.again}")
    return Verdict(msg if reporter else None, msg, PEER_LOST, [])


class _QuietStderr:
    """fd 2 to /dev/null while at least one thread is inside (fd 2 belongs to the process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = -1

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                sys.stderr.flush()
                self._saved = os.dup(2)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    os.dup2(self._saved, 2)
                    os.close(self._saved)


_stderr_to_devnull = _QuietStderr()


def _client(env: DistEnv, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(env.master_addr, env.master_port, is_master=False,
                         timeout=timedelta(seconds=max(timeout_s, 0.5)), wait_for_workers=False)


def _open_store(env: DistEnv, deadline: float) -> tuple[dist.TCPStore, object] | None:
    """(a store every survivor reaches, what keeps it alive here) or None when none answers."""
    if env.launcher == "torchrun":   # the agent's store outlives the workers
        try:
            return _client(env, deadline - time.monotonic()), None
        except (RuntimeError, ValueError):
            return None
    if env.rank == 0:
        try:       # host it again: the process group took the old one with it ...
            server = dist.TCPStore(env.master_addr, env.master_port, is_master=True,
                                   timeout=timedelta(seconds=GRACE_S), wait_for_workers=False)
        except (RuntimeError, ValueError):
            server = None  # ... unless it still listens: then use that one
        try:
            store = server if server is not None else _client(env, deadline - time.monotonic())
            store.set("loom/failure/host", "1")
            return store, server
        except (RuntimeError, ValueError):
            return None
    while time.monotonic() < deadline:   # wait for rank 0 to serve (an old store may vanish meanwhile)
        try:
            store = _client(env, min(1.0, deadline - time.monotonic()))
            store.wait(["loom/failure/host"], timedelta(seconds=max(0.5, min(1.0, deadline - time.monotonic()))))
            return store, None
        except (RuntimeError, ValueError):
            time.sleep(0.1)
    return None


def _prefix(env: DistEnv, environ: Mapping[str, str]) -> str:
    if env.launcher == "torchrun":   # one agent store may serve several runs and restarts
        return (f"loom/failure/{environ.get('TORCHELASTIC_RUN_ID', '')}/"
                f"{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
    return "loom/failure/"


def _wait_for_all(store: dist.TCPStore, key: str, world: int, deadline: float) -> None:
    while store.add(key, 0) < world and time.monotonic() < deadline:
        time.sleep(0.1)


def roll_call(error: BaseException, environ: Mapping[str, str] | None = None,
              grace_s: float = GRACE_S, after: Aftermath = TRAINING) -> Verdict:
    """Run on every rank that is still alive after `error`; says which ranks are lost.

    Takes at most about 2 x `grace_s` seconds (waiting for the store, then for the others).
    A rank that refused to run (`note_refusal`) is not lost: the job then ends with the
    refusal's status and line.
    """
    environ = os.environ if environ is None else environ
    env = detect(environ)
    reason = short_reason(error)
    sigterm = isinstance(error, Stopped)
    if env.world_size <= 1:
        return _verdict(env, [], True, reason, sigterm, after)
    prefix = _prefix(env, environ)
    with _stderr_to_devnull():
        opened = _open_store(env, time.monotonic() + grace_s)
        if opened is None:
            return _verdict(env, None, False, reason, sigterm, after)
        store, _keep = opened   # _keep: the store this rank hosts, alive until we return
        try:
            store.set(f"{prefix}alive/{env.rank}", "1")
            store.add(f"{prefix}count", 1)
            _wait_for_all(store, f"{prefix}count", env.world_size, time.monotonic() + grace_s)
            alive = [r for r in range(env.world_size) if store.check([f"{prefix}alive/{r}"])]
            refused = {r: store.get(f"{prefix}refused/{r}").decode()
                       for r in range(env.world_size) if store.check([f"{prefix}refused/{r}"])}
            lost = [r for r in range(env.world_size) if r not in alive and r not in refused]
            reporter = env.rank == min(alive, default=env.rank) and store.add(f"{prefix}reported", 1) == 1
            store.add(f"{prefix}done", 1)
            if env.launcher != "torchrun" and env.rank == 0:
                # the host stays until every survivor has read the roll call
                _wait_for_all(store, f"{prefix}done", len(alive), time.monotonic() + grace_s)
        except (RuntimeError, ValueError):
            return _verdict(env, None, False, reason, sigterm, after)
    if refused:   # the job ends because a rank refused; rank 0 printed it if it was one of them
        first = min(refused)
        line = f"error: on rank {first}: {refused[first]}" if first else f"error: {refused[first]}"
        return Verdict(line if reporter and 0 not in refused else None, line, 2, lost)
    return _verdict(env, lost, reporter, reason, sigterm, after)


def note_refusal(message: str, environ: Mapping[str, str] | None = None,
                 wait_s: float = 2 * GRACE_S) -> bool | None:
    """Under torchrun, record in the agent's store that this rank refuses to run (`message`, a
    LoomError's text), then wait up to `wait_s` for every rank to decide. Returns whether rank 0
    refused too (it then has printed the reason for the job), or None without torchrun.

    Waiting keeps the agent from stopping a rank that has not reached the same refusal yet
    (still importing, say): every rank then ends with the refusal's status, not with SIGTERM's.
    """
    environ = os.environ if environ is None else environ
    env = detect(environ)
    if env.launcher != "torchrun" or env.world_size <= 1:
        return None
    prefix = _prefix(env, environ)
    with _stderr_to_devnull():
        try:
            store = _client(env, 2.0)
            store.set(f"{prefix}refused/{env.rank}", message)
            store.add(f"{prefix}count", 1)
            _wait_for_all(store, f"{prefix}count", env.world_size, time.monotonic() + wait_s)
            return store.check([f"{prefix}refused/0"])
        except (RuntimeError, ValueError):
            return None


def write_error_file(message: str, environ: Mapping[str, str] | None = None) -> None:
    """Under torchrun, hand `message` to the agent, which shows it in its failure report (as the
    'traceback' of this rank) in place of a pointer to its documentation."""
    path = (os.environ if environ is None else environ).get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            # the layout torchrun's own ErrorHandler writes; it shows "py_callstack" as the traceback
            json.dump({"message": {"message": message, "extraInfo": {
                "py_callstack": message, "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass


class SignalGuard:
    """Turns SIGTERM into `Stopped` in the main thread while a run is in progress.

    Once the run is ending (`hold`), a later SIGTERM either ends the process at once with the
    status already decided, or is ignored while the roll call finishes (the launcher's SIGKILL,
    30 s later under torchrun, still ends it).
    """

    def __init__(self) -> None:
        self._exit_status: int | None = None
        self._holding = False
        self._installed = False
        self._previous = None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if not self._holding:
            raise Stopped(signum)
        if self._exit_status is not None:
            sys.stderr.flush()
            os._exit(self._exit_status)

    def __enter__(self) -> "SignalGuard":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:   # not the main thread: leave signals alone
            pass
        return self

    def hold(self, exit_status: int | None = None) -> None:
        self._holding = True
        self._exit_status = exit_status

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
