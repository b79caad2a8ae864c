"""Sharded checkpoints against today's unsplit ones: time to save and load, rank 0's memory during
the save, and the write speed against the disk's own.

    python -m benchmarks.checkpoint_io                    # ~1 B parameters on 4 ranks (48 GB of RAM)
    python -m benchmarks.checkpoint_io --params 2.5e8     # both formats on a 24 GB, 2-core machine
    python -m benchmarks.checkpoint_io --formats sharded  # 1 B, the sharded side alone (~20 GB)

A model of square fp32 matrices (4096 wide) is made on the meta device and materialised chunk by
chunk with random values by the zero plugin at stage 3 over `--ranks` data-parallel ranks (every
rank holds a quarter of the fp32 master weights and of both Adam moments: 12 bytes per parameter
over all ranks). Each format is saved through `Booster.save`, the trainer's own path, into a fresh
folder, then loaded back through `Booster.load` (and the loaded master weights compared with the
saved ones). A thread samples each rank's resident memory every 5 ms during the save.

Prints JSON lines: one per format with seconds and memory per rank, then
`checkpoint_save_peak_ratio` (rank 0's extra memory during the sharded save / its own shard's
bytes; target <= 1.2), `checkpoint_save_time_ratio` (sharded / unsplit save seconds; target <= 0.5)
and `checkpoint_write_efficiency` (the sharded save's bytes per second / the disk's sequential write
speed measured here with the same number of writers and fsync; target >= 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import torch
from torch import nn

WIDTH = 4096


class Matrices(nn.Module):
    def __init__(self, count: int, width: int) -> None:
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.empty(width, width)) for _ in range(count))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """The largest resident set while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.start, self.peak, self._stop = _rss(), _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.start


def _rank(count: int, width: int, folder: str, formats: tuple[str, ...]) -> dict:
    import torch.distributed as dist

    from core.booster import Booster, ZeroPlugin
    from core.config import MemoryConfig
    from core.distributed import Layout, ParallelMesh

    mesh = ParallelMesh.build(Layout(dp=dist.get_world_size()))
    with torch.device("meta"):
        model = Matrices(count, width)

    def draw(name: str, out: torch.Tensor) -> None:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        out.copy_(torch.randn(out.shape, generator=g))

    # a device budget of three chunks: no rank keeps the gathered model (on a CPU machine it would
    # share the host's memory with the states being measured)
    chunk_mb = width * width * 4 / 2**20
    plugin = ZeroPlugin(mesh, "fp32", 3, "none", MemoryConfig(chunk_mb=chunk_mb, device_gb=3 * chunk_mb / 1024),
                        materialize=draw)
    booster = Booster(plugin)
    wrapped, opt = plugin.configure(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    states = plugin.optimizer.optim
    shard_bytes = sum(states.get("master", c).numel() * 4 * 3 for c in plugin.manager.chunks)
    before = {c.index: states.get("master", c).clone() for c in plugin.manager.chunks[:2]}
    out = {"shard_bytes": shard_bytes, "rss_before": _rss()}
    for fmt in formats:
        where = Path(folder) / fmt
        dist.barrier()
        t0 = time.perf_counter()
        with Peak() as peak:
            booster.save(where, wrapped, opt, format=fmt)
        dist.barrier()
        saved = time.perf_counter() - t0
        for c in plugin.manager.chunks[:2]:         # the loaded values must be the saved ones
            states.get("master", c).zero_()
        t0 = time.perf_counter()
        with Peak() as load_peak:
            booster.load(where, wrapped, opt)
        dist.barrier()
        loaded = time.perf_counter() - t0
        same = all(torch.equal(states.get("master", c), before[c.index]) for c in plugin.manager.chunks[:2])
        out[fmt] = {"save_s": saved, "load_s": loaded, "save_extra_bytes": peak.extra,
                    "load_extra_bytes": load_peak.extra, "same": same}
        if dist.get_rank() == 0:
            out[fmt]["bytes"] = sum(p.stat().st_size for p in where.rglob("*") if p.is_file())
            shutil.rmtree(where)
        dist.barrier()
    plugin.close()
    return out


def _disk_writers(folder: Path, writers: int, total: int) -> float:
    """Bytes per second of `writers` processes each writing total/writers bytes and fsyncing."""
    import multiprocessing as mp

    each = total // writers
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_file, args=(folder / f"w{i}", each)) for i in range(writers)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    seconds = time.perf_counter() - t0
    for i in range(writers):
        (folder / f"w{i}").unlink(missing_ok=True)
    return each * writers / seconds


def _write_file(path: Path, size: int) -> None:
    block = os.urandom(8 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=1e9, help="parameters (rounded to 4096x4096 matrices)")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: a temporary folder)")
    ap.add_argument("--formats", default="sharded,unsplit", help="which formats to run (the unsplit one gathers the "
                                                                  "whole model and its moments on every rank)")
    args = ap.parse_args(argv)

    from benchmarks._machine import machine
    from core.distributed.testing import run_distributed

    count = max(args.ranks, round(args.params / WIDTH**2))
    root = Path(tempfile.mkdtemp(prefix="loom-ckpt-", dir=args.dir))
    try:
        formats = tuple(f for f in ("sharded", "unsplit") if f in args.formats.split(","))
        results = run_distributed(_rank, world_size=args.ranks, args=(count, WIDTH, str(root), formats),
                                  timeout=3600)
        r0 = results[0]
        params = count * WIDTH**2
        lines, by = [], {}
        for fmt in formats:
            by[fmt] = {"name": f"checkpoint_{fmt}", "params": params, "ranks": args.ranks,
                       "bytes": r0[fmt]["bytes"], "save_s": round(max(r[fmt]["save_s"] for r in results), 2),
                       "load_s": round(max(r[fmt]["load_s"] for r in results), 2),
                       "save_extra_gib_per_rank": [round(r[fmt]["save_extra_bytes"] / 2**30, 3) for r in results],
                       "load_extra_gib_per_rank": [round(r[fmt]["load_extra_bytes"] / 2**30, 3) for r in results],
                       "loaded_equal_saved": all(r[fmt]["same"] for r in results), "machine": machine()}
            lines.append(by[fmt])
        if "sharded" in by:
            sharded = by["sharded"]
            disk = _disk_writers(root, args.ranks, r0["sharded"]["bytes"])
            peak = {"name": "checkpoint_save_peak_ratio",
                    "value": round(r0["sharded"]["save_extra_bytes"] / r0["shard_bytes"], 3), "target": 1.2,
                    "shard_gib": round(r0["shard_bytes"] / 2**30, 3)}
            if "unsplit" in by:
                peak["unsplit_value"] = round(r0["unsplit"]["save_extra_bytes"] / r0["shard_bytes"], 3)
            lines.append(peak)
            if "unsplit" in by:
                lines.append({"name": "checkpoint_save_time_ratio",
                              "value": round(sharded["save_s"] / by["unsplit"]["save_s"], 3), "target": 0.5})
            lines.append({"name": "checkpoint_write_efficiency",
                          "value": round(sharded["bytes"] / sharded["save_s"] / disk, 3), "target": 0.5,
                          "sharded_mb_s": round(sharded["bytes"] / sharded["save_s"] / 2**20, 1),
                          "disk_mb_s": round(disk / 2**20, 1)})
        for line in lines:
            print(json.dumps(line), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
