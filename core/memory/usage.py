"""How much memory this process uses now, its peak, and how much it may still take, on a GPU
(torch's allocator) or on the host (Linux /proc and the cgroup limit; bytes allocated where an
allocation counter is preloaded)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cgroup_files() -> tuple[Path, Path] | None:
    """This process's cgroup memory limit and usage files (v1 or v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            base = Path("/sys/fs/cgroup/memory") / parts[2].lstrip("/")
            return base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        if parts[1] == "":
            base = Path("/sys/fs/cgroup") / parts[2].lstrip("/")
            return base / "memory.max", base / "memory.current"
    return None


def _cgroup_bytes() -> tuple[int, int] | None:
    """(limit, usage) of this process's cgroup, if it has a limit."""
    files = _cgroup_files()
    if files is None:
        return None
    try:
        text = files[0].read_text().strip()
        if text == "max" or int(text) >= 1 << 60:
            return None
        return int(text), int(files[1].read_text())
    except (OSError, ValueError):
        return None


def _cgroup_limit() -> int | None:
    """What the cgroup's limit leaves beyond its current usage, if there is a limit."""
    found = _cgroup_bytes()
    return None if found is None else found[0] - found[1]


def host_room() -> int:
    """Host memory this process may still take for itself: the smaller of MemAvailable and what
    the cgroup's limit leaves beyond this process's resident set. Unlike `free_bytes` it does not
    count the cgroup's page cache as used (the kernel reclaims it under the limit): a file just
    written or read, or a previous process of the same cgroup, leaves it full."""
    available = _status_meminfo("MemAvailable")
    found = _cgroup_bytes()
    return available if found is None else min(available, found[0] - _status("VmRSS"))


def process_bytes(device: torch.device) -> int:
    """What this process holds now: the CUDA allocator's tensors, or the resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status("VmRSS")


_HEAP = None     # the preloaded allocation counter: not looked for yet (None), absent (False), or the library


def _heap_counter():
    """The allocation counter preloaded into this process (`LD_PRELOAD` of a library that exports
    `loom_heap_live`, `loom_heap_peak` and `loom_heap_reset_peak`, as `benchmarks/heapcount.c` does:
    the bytes malloc has handed out and not taken back, on every thread), or None."""
    global _HEAP
    if _HEAP is None:
        lib = ctypes.CDLL(None)
        if hasattr(lib, "loom_heap_peak"):
            lib.loom_heap_live.restype = lib.loom_heap_peak.restype = ctypes.c_longlong
            _HEAP = lib
        else:
            _HEAP = False
    return _HEAP or None


def allocated_bytes(device: torch.device) -> int | None:
    """The bytes allocated and not yet freed: the CUDA allocator's tensors, or on the host what a
    preloaded allocation counter counts (None without one). Unlike the resident set, this leaves
    out what the allocator keeps of freed blocks."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    heap = _heap_counter()
    return None if heap is None else int(heap.loom_heap_live())


def allocated_peak(device: torch.device) -> int | None:
    """The most `allocated_bytes` since the last `reset_peak` (None on the host without a counter)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    heap = _heap_counter()
    return None if heap is None else int(heap.loom_heap_peak())


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    heap = _heap_counter()
    if heap is not None:
        heap.loom_heap_reset_peak()
    try:
        Path("/proc/self/clear_refs").write_text("5")       # VmHWM back to the current VmRSS
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    """The high-water mark since the last `reset_peak` (or the start)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _status("VmHWM")


def free_bytes(device: torch.device) -> int:
    """What this process could still allocate: free device memory, or the host's available
    memory within the cgroup's limit."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _status_meminfo("MemAvailable")
    room = _cgroup_limit()
    return available if room is None else min(available, room)


def _status_meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0
