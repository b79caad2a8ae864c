"""Build the allocation counter (`heapcount.c`) and preload it into the processes started after
`preload()`: `core.memory.usage.allocated_bytes` / `allocated_peak` then count the host's allocated
bytes there, and the Trainer reports the steps' peak as `step_peak_allocated_bytes`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from core.errors import LoomError

SOURCE = Path(__file__).with_name("heapcount.c")


def build(folder: Path) -> Path:
    """Compile the counter into `folder`; the library's path."""
    lib = Path(folder) / "libloomheap.so"
    cc = os.environ.get("CC", "cc")
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(SOURCE)], check=True,
                       capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise LoomError(f"could not build the allocation counter with {cc}: {detail.strip()}; "
                        f"measure the resident set instead (--memory rss)") from None
    return lib


def preload(folder: Path) -> Path:
    """Build the counter and add it to `LD_PRELOAD` for processes started from now on
    (run_distributed's forkserver must not be running yet: it passes its own environment on)."""
    lib = build(folder)
    os.environ["LD_PRELOAD"] = " ".join(filter(None, [str(lib), os.environ.get("LD_PRELOAD", "")]))
    return lib
