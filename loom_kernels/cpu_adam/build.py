"""Compile a torch C++ extension once per machine, so that no killed build can block a later load.

Why `torch.utils.cpp_extension.load` alone is not enough: it guards its build folder with a
`lock` file made with O_EXCL and deleted when the build ends, and a process that finds the file
polls until it disappears. A builder that is killed (SIGKILL; the OOM killer of a memory-capped
cgroup, which is how this was found) never deletes it, and every later load of the same extension
then waits forever without a word.

What this module does instead, combining the two usual remedies:

1. Mutual exclusion with `fcntl.flock` on `<root>/<name>.lock`. The operating system drops a flock
   when the last descriptor of its holder closes, and a process closes them all however it ends
   (exit, exception, SIGKILL, OOM kill). So the lock cannot outlive its holder, and there is no
   "stale lock" to recognise: no pid liveness test, no pid reuse, no timeout to guess. The
   descriptor is not inherited by the compiler (Python opens files close-on-exec), so an orphaned
   compiler cannot keep it either. The holder writes its pid, host, command and build folder
   into the file; a process that has waited `wait_notice_s` seconds prints them in one line on
   stderr and goes on waiting. The file itself stays (deleting a flock file would race with the
   next holder); it is a few bytes, and nothing ever waits on its existence.
2. The compiler works in a private folder, `<root>/<name>.building-<pid>`, and the finished folder
   is renamed to `<root>/<name>` in one atomic step. So `<root>/<name>` either holds a complete
   build or does not exist, and a process that finds it imports the library directly, with no
   lock, no ninja run and no wait, even while another process holds the lock. torch's own `lock`
   file only ever lives inside a private folder that no other process looks at. A killed build
   leaves just its private folder, and the next builder (holding the lock, so certain that the
   folder's owner is gone) deletes it, together with a `<root>/<name>` that lacks its library
   (the layout of older versions, where a stale torch `lock` sat).

The flock alone would prevent the hang; the rename is what lets loaders skip the lock entirely once
a build exists and guarantees that nobody ever imports a half-linked library. Since loaders do not
re-run ninja, the caller must put everything the binary depends on (sources, flags, torch version)
into `name`.

Without `fcntl` (Windows) the lock is skipped: two concurrent builders then both compile, each in
its own folder, and the second rename finds the first build in place and uses it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None

import torch

LIB_EXT = ".pyd" if sys.platform == "win32" else ".so"


def build_root() -> Path:
    """Where torch puts JIT extensions: $TORCH_EXTENSIONS_DIR, or ~/.cache/torch_extensions/py311_cpu."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _command_line() -> str:
    """This process's command, as typed: `python -m loom_kernels.cpu_adam`, `pytest tests/kernels`, ..."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    argv[0] = Path(argv[0]).name
    return " ".join(" ".join(argv).split())[:160]     # one line, even for `python -c "...multi-line..."`


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BuildLock:
    """An exclusive `flock` on `path`, held for the `with` block; see the module docstring.

    `label` starts the waiting line (the kernel's name); `what` says what the holder is doing."""

    def __init__(self, path: str | os.PathLike, *, label: str = "build", what: str = "a build",
                 wait_notice_s: float = 3.0, say: Callable[[str], None] = _stderr) -> None:
        self.path = Path(path)
        self.label, self.what, self.wait_notice_s, self.say = label, what, wait_notice_s, say
        self._fd: int | None = None

    def __enter__(self) -> "BuildLock":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire()
            self.record()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        return self

    def __exit__(self, *exc) -> None:
        fd, self._fd = self._fd, None
        try:
            if fcntl is not None:
                os.ftruncate(fd, 0)  # the next reader sees no holder rather than a finished one
        finally:
            os.close(fd)             # this releases the flock

    def _acquire(self) -> None:
        if fcntl is None:
            return
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            waited = time.monotonic() - start
            if waited >= self.wait_notice_s:
                self.say(self._waiting_line(waited))
                fcntl.flock(self._fd, fcntl.LOCK_EX)   # until the holder ends, however it ends
                return
            time.sleep(0.05)

    def holder(self) -> dict:
        """What the current holder wrote into the lock file ({} if nothing readable)."""
        if fcntl is None:
            return {}
        try:
            info = json.loads(os.pread(self._fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}
        if not isinstance(info, dict):
            return {}
        pid = info.get("pid")
        if info.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            return {}     # written by a holder that is gone; the new one has not written yet
        return info

    def _waiting_line(self, waited: float) -> str:
        info = self.holder()
        if info.get("pid"):
            who = f"process {info['pid']}"
            if info.get("host") and info["host"] != socket.gethostname():
                who += f" on {info['host']}"
            if info.get("command"):
                who += f" ({info['command']})"
        else:
            who = "another process"
        where = info.get("building") or str(self.path)
        return (f"{self.label}: waiting for {who}, which is {self.what} in {where} "
                f"({waited:.0f} s so far; lock {self.path}); going on as soon as it finishes or dies")

    def record(self, **extra) -> None:
        """Write who holds the lock (and `extra`, e.g. building=FOLDER) for waiters to report."""
        if fcntl is None:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "command": _command_line(), "since": time.time(),
                **{k: str(v) for k, v in extra.items()}}
        data = json.dumps(info).encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))


def import_library(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_or_build(name: str, sources: list[str], *, extra_cflags: list[str], extra_ldflags: list[str],
                  label: str, what: str, expected: str = "", root: Path | None = None,
                  wait_notice_s: float = 3.0, say: Callable[[str], None] = _stderr
                  ) -> tuple[ModuleType, Path, float | None]:
    """The extension `name`, imported from `<root>/<name>/<name>.so`, compiled first if absent.

    Returns (module, library path, seconds spent compiling or None if it was found built).
    Raises what torch raises when it cannot compile (no compiler, no ninja, a compile error)."""
    root = Path(root) if root is not None else build_root()
    published = root / name
    library = published / f"{name}{LIB_EXT}"
    if library.exists():
        return import_library(name, library), library, None
    root.mkdir(parents=True, exist_ok=True)
    with BuildLock(root / f"{name}.lock", label=label, what=f"compiling {what}",
                   wait_notice_s=wait_notice_s, say=say) as lock:
        if library.exists():                        # the process we waited for has built it
            return import_library(name, library), library, None
        # Holding the lock, we know every other build of `name` is dead: clear what they left.
        for leftover in root.glob(f"{name}.building-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if published.exists():                      # no library: an interrupted build of an older layout
            shutil.rmtree(published, ignore_errors=True)
        private = root / f"{name}.building-{os.getpid()}"
        private.mkdir()
        lock.record(building=private)
        say(f"{label}: compiling {what} into {published}{f' ({expected})' if expected else ''} ...")
        start = time.monotonic()
        try:
            from torch.utils.cpp_extension import load

            # copies: torch appends its own flags to the lists it is given, which changed the
            # caller's flags (and so the kernel's cache name) after a first compile in a process
            module = load(name=name, sources=list(sources), extra_cflags=list(extra_cflags),
                          extra_ldflags=list(extra_ldflags), build_directory=str(private), verbose=False)
            seconds = time.monotonic() - start
            try:
                os.rename(private, published)
            except OSError:
                if not library.exists():            # not "someone unlocked published it first"
                    raise
                shutil.rmtree(private, ignore_errors=True)
        except BaseException:
            shutil.rmtree(private, ignore_errors=True)
            raise
    try:
        module.__file__ = str(library)              # it was imported from the private folder
    except (AttributeError, TypeError):
        pass
    return module, library, seconds
