"""Running Loom's commands from tests as a user runs them: a fresh Python process each."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


def run_at_once(commands: Sequence[Sequence[str]], *, env: dict[str, str] | None = None, cwd: Path = REPO,
                timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Several independent commands started together; their results (status, stdout, stderr) in
    order. A command's start is mostly imports on one core (torch, diffusers: 3-6 s), so on 2
    cores a handful together take about half as long as one after another."""
    env = dict(os.environ if env is None else env)
    procs = [subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    try:
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

