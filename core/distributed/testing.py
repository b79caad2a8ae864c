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
import tempfile
import time
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
    finally:
        dist.destroy_process_group()


class RankTimeout(RuntimeError):
    pass


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
                raise
            return [torch.load(Path(out_dir) / f"rank_{r}.pt", weights_only=False)
                    for r in range(world_size)]
    assert last is not None
    raise last
