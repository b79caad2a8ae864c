"""Running Loom's commands from tests as a user runs them: a process of its own each.

A `python -m MODULE ...` command is forked from the test harness's forkserver, which imported
torch and the engine once (`core.distributed.testing.Module`: the module runs as `__main__`, with
its own environment, working directory, exit status and output); a fresh interpreter would spend
about 4 s of CPU on those imports each time. Any other command (torchrun, an installed console
script) starts as a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from core.distributed.testing import Module

REPO = Path(__file__).resolve().parents[1]


def run_at_once(commands: Sequence[Sequence[str]], *, env: dict[str, str] | None = None, cwd: Path = REPO,
                timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Several independent commands started together; their results (status, stdout, stderr) in
    order. A command's start is mostly imports on one core (torch, diffusers: 3-6 s), so on 2
    cores a handful together take about half as long as one after another."""
    env = dict(os.environ if env is None else env)
    procs = []
    try:
        for args in commands:
            args = [str(a) for a in args]
            if args[0] == sys.executable and args[1] == "-m":
                procs.append(Module(args[2], args[3:], env, cwd=cwd))
            else:
                procs.append(subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
        results = []
        for p in procs:
            if isinstance(p, Module):
                results.append(p.wait(timeout))
            else:
                out, err = p.communicate(timeout=timeout)
                results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return results
    finally:
        for p in procs:
            if isinstance(p, subprocess.Popen) and p.poll() is None:
                p.kill()
                p.wait()
            elif isinstance(p, Module) and p.proc.is_alive():
                p.proc.kill()
                p.proc.join()

