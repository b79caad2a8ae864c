"""Building the C++ CPU Adam: a killed build never blocks later loads, concurrent loads compile once,
and a process that waits on another's build says whom it waits for.

Every build here goes to a private TORCH_EXTENSIONS_DIR under tmp_path, never to the shared cache.
The slow test compiles the kernel once (about 20 s on 2 cores); the others compile nothing.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loom_kernels.cpu_adam import kernel_name
from loom_kernels.cpu_adam.build import BuildLock, load_or_build

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 600          # a cold build takes about 20 s here; a hang is what this catches


def _can_compile() -> bool:
    ninja = shutil.which("ninja") or (Path(sys.executable).parent / "ninja").exists()
    return bool(ninja and shutil.which(os.environ.get("CXX", "c++")))


needs_compiler = pytest.mark.skipif(not _can_compile(), reason="no C++ compiler or ninja here")


@pytest.fixture
def procs():
    """Started processes (each in its own process group); whatever is still running at the end is killed."""
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _env(ext: Path, **extra) -> dict:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _start(procs, args, ext, **extra) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(ext, **extra), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    procs.append(p)
    return p


def _finish(p: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"still running after {timeout} s (a load that hangs):\n{out}\n{err[-3000:]}")


HOLD = """
import sys, time
from loom_kernels.cpu_adam.build import BuildLock, load_or_build
with BuildLock(sys.argv[1]) as lock:
    lock.record(building=sys.argv[2])
    print("held", flush=True)
    time.sleep(600)
"""

WAIT = """
import sys, time
from loom_kernels.cpu_adam.build import BuildLock, load_or_build
start = time.monotonic()
with BuildLock(sys.argv[1], label="test", what="compiling X", wait_notice_s=0.5):
    print(f"acquired after {time.monotonic() - start:.1f} s", flush=True)
"""


def test_a_waiter_says_whom_it_waits_for_and_goes_on_when_the_holder_is_killed(tmp_path, procs):
    lock, building = tmp_path / "k.lock", tmp_path / "k.building-1"
    holder = _start(procs, ["-c", HOLD, str(lock), str(building)], tmp_path)
    assert holder.stdout.readline().strip() == "held", holder.communicate()
    waiter = _start(procs, ["-c", WAIT, str(lock)], tmp_path)
    notice = waiter.stderr.readline()          # blocks until the waiter has waited 0.5 s and said so
    assert waiter.poll() is None, "the waiter did not wait for the holder"
    assert notice.startswith("test: waiting for process "), notice
    assert f"process {holder.pid} " in notice and str(building) in notice and str(lock) in notice, notice
    time.sleep(1.0)
    assert waiter.poll() is None                # still waiting: the lock is really held
    os.kill(holder.pid, signal.SIGKILL)         # a holder that dies without any clean-up
    holder.wait()
    out, err = _finish(waiter, 60)
    assert waiter.returncode == 0, err
    assert out.startswith("acquired after"), out
    assert err == "", err                       # the notice was the one line on stderr


def test_without_a_compiler_load_gives_none_with_one_warning_and_the_command_fails(tmp_path, procs):
    ext = tmp_path / "ext"
    check = ("import warnings\n"
             "import loom_kernels.cpu_adam as k\n"
             "with warnings.catch_warnings(record=True) as w:\n"
             "    warnings.simplefilter('always')\n"
             "    print(k.load() is None, k.load() is None, k.available(), len(w))\n")
    p = _start(procs, ["-c", check], ext, CXX=str(tmp_path / "no-such-compiler"))
    out, err = _finish(p, 120)
    assert out.split() == ["True", "True", "False", "1"], (out, err[-2000:])
    p = _start(procs, ["-m", "loom_kernels.cpu_adam"], ext, CXX=str(tmp_path / "no-such-compiler"))
    out, err = _finish(p, 120)
    assert p.returncode != 0
    assert len(out.splitlines()) == 1 and "not available" in out and "no-such-compiler" in out, out
    assert not list(ext.glob("*.building-*")), "a failed build left its folder"


def _counting_compiler(tmp_path: Path) -> tuple[Path, Path]:
    """A compiler that logs each compilation (torch also runs it to ask for its version)."""
    log = tmp_path / "compilations"
    real = shutil.which(os.environ.get("CXX", "c++"))
    wrapper = tmp_path / "bin" / "g++"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -c "*) echo "$PPID" >> "{log}";; esac\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


@needs_compiler
@pytest.mark.slow
def test_after_a_build_killed_mid_compile_two_loads_at_once_compile_once(tmp_path, procs):
    """One cold build proves three things: what a killed build leaves (torch's `lock` in its folder,
    and the stale lock of the layout before this fix) blocks nobody; two processes loading at once
    compile once, the other saying whom it waits for; a finished build loads without the lock."""
    ext = tmp_path / "ext"
    name = kernel_name()
    first = _start(procs, ["-m", "loom_kernels.cpu_adam"], ext)
    private = ext / f"{name}.building-{first.pid}"
    deadline = time.monotonic() + 120
    while not (private / "build.ninja").exists():       # torch has taken its `lock` by then
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first build never started compiling"
        time.sleep(0.1)
    time.sleep(2.0)                                      # the compiler is running now
    os.killpg(first.pid, signal.SIGKILL)                 # as the cgroup's OOM killer does: all of it
    first.wait()
    assert (private / "lock").exists(), "expected torch's lock file to be left behind"
    # ... and the stale lock of the layout before this fix: torch's O_EXCL `lock` in the build folder.
    (ext / name).mkdir()
    os.close(os.open(ext / name / "lock", os.O_CREAT | os.O_EXCL))

    wrapper, log = _counting_compiler(tmp_path)
    a = _start(procs, ["-m", "loom_kernels.cpu_adam"], ext, CXX=str(wrapper))
    b = _start(procs, ["-m", "loom_kernels.cpu_adam"], ext, CXX=str(wrapper))
    results = {p.pid: (*_finish(p, BUILD_TIMEOUT), p.returncode) for p in (a, b)}
    library = ext / name / f"{name}.so"
    for pid, (out, err, rc) in results.items():
        assert rc == 0, (pid, err[-3000:])
        assert out.startswith(f"C++ CPU Adam ready: {library}"), out
    assert len(log.read_text().splitlines()) == 1, "compiled more than once"
    assert library.exists() and not (ext / name / "lock").exists()
    assert not list(ext.glob("*.building-*")), "the killed build's folder was not cleared"

    def compiled(err):
        return [line for line in err.splitlines() if line.startswith("loom_kernels.cpu_adam: compiling ")]

    builders = [pid for pid, (out, err, rc) in results.items() if compiled(err)]
    assert len(builders) == 1, results
    builder = builders[0]
    assert results[builder][0].startswith(f"C++ CPU Adam ready: {library} (compiled in ")
    waiter = (set(results) - {builder}).pop()
    out, err, _ = results[waiter]
    assert "compiled in" not in out and not compiled(err), (out, err)
    notices = [line for line in err.splitlines() if "waiting for" in line]
    assert len(notices) == 1, err
    assert notices[0].startswith(f"loom_kernels.cpu_adam: waiting for process {builder} "), notices[0]
    assert f"{name}.building-{builder}" in notices[0], notices[0]

    # A finished build is loaded without the lock: even a holder that never lets go cannot block it.
    with BuildLock(ext / f"{name}.lock"):
        third = _start(procs, ["-m", "loom_kernels.cpu_adam"], ext)
        out, err = _finish(third, 60)
    assert third.returncode == 0 and out.strip() == f"C++ CPU Adam ready: {library}", (out, err)
    assert "waiting" not in err and "compiling" not in err, err


def test_a_build_leaves_the_callers_flags_alone(tmp_path, monkeypatch):
    """torch's `load` appends its own flags to the lists it is given; the kernel's cache name is a
    hash of its flags, so a first compile in a process used to rename the kernel for the rest of it."""
    import torch.utils.cpp_extension as ext

    def load(*, extra_cflags, extra_ldflags, build_directory, **_):
        extra_cflags.append("-std=c++17")
        extra_ldflags.append("-shared")
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return object()

    monkeypatch.setattr(ext, "load", load)
    name, cflags, ldflags = "flags_probe", ["-O3"], ["-fopenmp"]
    load_or_build(name, ["x.cpp"], extra_cflags=cflags, extra_ldflags=ldflags, label="test", what="X",
                  root=tmp_path, say=lambda line: None)
    assert cflags == ["-O3"] and ldflags == ["-fopenmp"]
    assert (tmp_path / name / f"{name}.so").exists()
