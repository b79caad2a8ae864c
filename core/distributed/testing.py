"""Run a function on N gloo ranks on this machine: the harness every distributed test uses.

    results = run_distributed(worker, world_size=4, args=(x,))

starts 4 fresh processes, sets the launcher variables (`RANK`, `WORLD_SIZE`,
`MASTER_ADDR`, `MASTER_PORT`, ...) on a free port, joins a gloo process group, calls
`worker(*args)` in each, and returns the list of their return values in rank order. A rank
that raises fails the call with that rank's traceback; ranks that hang past `timeout` are
killed and reported. A port taken between choosing and binding it is retried.

The ranks are forked from a server process that imported torch and Loom's engine once
(`multiprocessing`'s forkserver), not spawned: a spawned rank spends about 2.5 s of CPU importing
torch, which on 2 cores made a do-nothing call on 8 ranks take 16 s. Each rank starts with the
caller's environment and working directory, as a spawned one would, and no state of the caller's
(the forkserver never ran a torch op, so no thread pool is forked).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# imported once by the forkserver; the ranks inherit them (a module not listed is imported by
# each rank, as before). torch._dynamo: torch's optimizers import it when the first one is built
# (3.5 s of CPU per rank on 2 cores); matplotlib.pyplot: the loss curve rank 0 draws at the end (2 s).
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "matplotlib.pyplot", "core.session", "core.booster",
           "core.trainer"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, out_dir: str,
           args: Sequence[Any], threads: int, env: dict[str, str], cwd: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=120))
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank_{rank}.pt")
    except BaseException:
        # spawn reports one rank's error; a peer's "connection reset" often hides the rank that failed first
        (Path(out_dir) / f"error_{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


class RankTimeout(RuntimeError):
    pass


def _module_entry(module: str, argv: Sequence[str], env: dict[str, str], cwd: str, stdout_path: str,
                  stderr_path: str) -> None:
    """`python -m module argv...` in a process forked from the forkserver: the module runs as
    `__main__`, its exit status is the process's, what it writes goes to two files."""
    import runpy

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(write_through=True, line_buffering=True)     # unbuffered, as PYTHONUNBUFFERED
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.path.insert(0, cwd)                    # as `python -m` puts the working directory first
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class Module:
    """`python -m module argv...` in a process forked from the forkserver, which has torch and the
    engine imported already (a fresh `python -m` spends about 4 s of CPU importing them on 2
    cores). `env` replaces the environment (default: this process's). `wait` gives what
    `subprocess.run` would: its exit status (negative for a signal), its stdout and stderr."""

    def __init__(self, module: str, argv: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        mp.set_forkserver_preload(PRELOAD)
        self.module, self.args = module, [sys.executable, "-m", module, *map(str, argv)]
        self._tmp = tempfile.TemporaryDirectory(prefix="loom-run-")
        self._out, self._err = Path(self._tmp.name) / "stdout", Path(self._tmp.name) / "stderr"
        self.proc = mp.get_context("forkserver").Process(
            target=_module_entry, args=(module, self.args[3:], dict(os.environ if env is None else env),
                                        str(cwd or os.getcwd()), str(self._out), str(self._err)))
        self.proc.start()

    def wait(self, timeout: float = 600.0, kill_after_s: float | None = None) -> subprocess.CompletedProcess:
        """How it ended (SIGKILLed after `kill_after_s`, if given)."""
        proc = self.proc
        if kill_after_s is not None:
            proc.join(kill_after_s)
            if proc.is_alive():
                proc.kill()
        proc.join(timeout)
        try:
            if proc.is_alive():
                proc.kill()
                proc.join()
                raise RankTimeout(f"python -m {self.module} still running after {timeout:.0f} s")
            read = [f.read_text(errors="replace") if f.exists() else "" for f in (self._out, self._err)]
            return subprocess.CompletedProcess(self.args, proc.exitcode, *read)
        finally:
            self._tmp.cleanup()


def run_module(module: str, argv: Sequence[str], env: dict[str, str] | None = None, *,
               kill_after_s: float | None = None, timeout: float = 600.0, cwd: str | os.PathLike | None = None
               ) -> subprocess.CompletedProcess:
    """`Module(...).wait(...)`: run it to the end."""
    return Module(module, argv, env, cwd).wait(timeout, kill_after_s)


def run_distributed(fn: Callable, world_size: int, args: Sequence[Any] = (), *,
                    timeout: float = 240.0, threads: int = 1, env: dict[str, str] | None = None,
                    retries: int = 3) -> list[Any]:
    """`fn(*args)` on `world_size` gloo ranks; each rank's return value, in rank order.

    `fn` must be importable by name (a module-level function): each rank, forked from the
    forkserver, imports it from its module.
    """
    last: BaseException | None = None
    mp.set_forkserver_preload(PRELOAD)
    env = {**os.environ, **(env or {})}
    for _ in range(retries):
        with tempfile.TemporaryDirectory(prefix="loom-dist-") as out_dir:
            port = free_port()
            ctx = mp.start_processes(_entry, args=(fn, world_size, port, out_dir, tuple(args), threads,
                                                   env, os.getcwd()),
                                     nprocs=world_size, join=False, start_method="forkserver")
            deadline = time.monotonic() + timeout
            try:
                while not ctx.join(timeout=1.0):
                    if time.monotonic() > deadline:
                        alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                        for p in ctx.processes:
                            if p.is_alive():
                                p.kill()
                        raise RankTimeout(f"ranks {alive} of {world_size} still running after "
                                          f"{timeout:.0f} s (a collective that some rank never joined?)")
            except mp.ProcessRaisedException as e:
                if "Address already in use" in str(e) or "EADDRINUSE" in str(e):
                    last = e
                    continue
                others = [(r, Path(out_dir) / f"error_{r}.txt") for r in range(world_size) if r != e.error_index]
                others = [f"\n-- rank {r} failed too:\n{f.read_text()}" for r, f in others if f.exists()]
                if others:
                    raise mp.ProcessRaisedException(str(e) + "".join(others), e.error_index, e.error_pid) from None
                raise
            return [torch.load(Path(out_dir) / f"rank_{r}.pt", weights_only=False)
                    for r in range(world_size)]
    assert last is not None
    raise last
