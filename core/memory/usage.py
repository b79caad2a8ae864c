"""How much memory this process uses now, its peak, and how much it may still take, on a GPU
(torch's allocator) or on the host (Linux /proc and the cgroup limit)."""

from __future__ import annotations

from pathlib import Path

import torch


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cgroup_limit() -> int | None:
    """This process's cgroup memory limit and current usage (v1 or v2), if there is a limit."""
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
            limit, usage = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        elif parts[1] == "":
            base = Path("/sys/fs/cgroup") / parts[2].lstrip("/")
            limit, usage = base / "memory.max", base / "memory.current"
        else:
            continue
        try:
            text = limit.read_text().strip()
            if text == "max" or int(text) >= 1 << 60:
                return None
            return int(text) - int(usage.read_text())
        except (OSError, ValueError):
            return None
    return None


def process_bytes(device: torch.device) -> int:
    """What this process holds now: the CUDA allocator's tensors, or the resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status("VmRSS")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
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
