"""How close NVMe offload comes to the better of its two bounds: compute alone, and the disk alone.

    python -m benchmarks.offload_efficiency            # GPT k=12 of the capacity family (91 M parameters)
    python -m benchmarks.offload_efficiency --quick    # k=8 (29 M), 2 timed steps

Three measurements in one process, on the same model and tokens, taken in alternating rounds
(the median of the per-round ratios is reported, since the disk's speed drifts over minutes):

1. offload: the zero plugin with `parallel.offload=nvme`, a device budget of a quarter of the
   parameters (so parameters stream in every forward and backward, and every optimizer state
   lives only on disk), steps inside backward. A warm-up step traces the order of use; each
   timed step counts the bytes the NVMe store read and wrote.
2. compute: the same engine with nothing offloaded and no budget (every chunk and state in
   memory): the same kernels, no IO. Its step time is the compute bound.
3. disk: the bytes of that round's offloaded step, read and written through the same kind of
   store (O_DIRECT files, aligned buffers, as many IO threads) in chunk-sized requests, all in
   flight at once: the disk bound.

Prints a JSON line per round and `{"name": "offload_efficiency", "value": median of offload /
max(compute, disk)}`; 1.0 would mean perfect overlap of IO with compute (target: at most 1.3).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from apps.gpt.config import GPTModelConfig
from apps.gpt.model import GPT
from benchmarks._machine import machine
from benchmarks.memory_capacity import SEQ, VOCAB, family, params_of
from core.booster import ZeroPlugin
from core.config import MemoryConfig
from core.distributed import Layout, ParallelMesh
from core.memory.store import NVMeStore


class Engine:
    """One model of the family on the zero plugin: offloaded to NVMe, or all in memory."""

    def __init__(self, k: int, offload: bool, nvme_dir: Path) -> None:
        torch.manual_seed(0)
        cfg = GPTModelConfig(**family(k))
        with torch.device("meta"):
            model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        chunk_mb = max(p.numel() for p in model.parameters()) * 4 / 2**20
        mesh = ParallelMesh.build(Layout())
        if offload:
            # a quarter of the fp32 parameters (and room for the two chunks an operation may need)
            budget = max(params_of(k) * 4 / 4, 2.5 * chunk_mb * 2**20) / 2**30
            memory = MemoryConfig(chunk_mb=chunk_mb, device_gb=budget, io_threads=2, prefetch=2,
                                  step_in_backward=True)
            self.plugin = ZeroPlugin(mesh, "fp32", stage=3, offload="nvme", memory=memory, nvme_dir=nvme_dir,
                                       materialize=model.init_parameter)
        else:
            memory = MemoryConfig(chunk_mb=chunk_mb, step_in_backward=True)
            self.plugin = ZeroPlugin(mesh, "fp32", stage=1, memory=memory, materialize=model.init_parameter)
        self.model, self.opt = self.plugin.configure(model, opt)
        self.tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=torch.Generator().manual_seed(1))
        self.store = self.plugin.manager.home if offload else None

    def step(self) -> tuple[float, int, int]:
        """Seconds, bytes read and bytes written by one training step."""
        r0, w0 = (self.store.bytes_read, self.store.bytes_written) if self.store else (0, 0)
        t = time.perf_counter()
        logits = self.model(self.tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), self.tokens[:, 1:].reshape(-1))
        self.opt.backward(loss)
        self.opt.step()
        self.opt.zero_grad()
        seconds = time.perf_counter() - t
        if self.store is None:
            return seconds, 0, 0
        return seconds, self.store.bytes_read - r0, self.store.bytes_written - w0


class RawDisk:
    """The same store (O_DIRECT files, aligned buffers, IO threads), moving given byte counts in
    chunk-sized requests, all in flight at once."""

    def __init__(self, folder: Path, chunk_bytes: int, max_bytes: int, threads: int = 2) -> None:
        self.chunk = chunk_bytes
        count = max(1, -(-max_bytes // chunk_bytes))
        self.store = NVMeStore(folder, {"a": (count, chunk_bytes), "b": (count, chunk_bytes)}, threads=threads)
        self.buf = torch.ones(chunk_bytes // 4)
        for i in range(count):              # the read side reads data that exists (not holes)
            self.store.write("b", i, self.buf)
        self.outs = [torch.empty(chunk_bytes // 4) for _ in range(4)]

    def time(self, read: int, written: int) -> float:
        n_r, n_w = -(-read // self.chunk), -(-written // self.chunk)
        t = time.perf_counter()
        futures = [self.store.write_async("a", i, self.buf) for i in range(n_w)]
        futures += [self.store.read_async("b", i, self.outs[i % 4]) for i in range(n_r)]
        for f in futures:
            f.result()
        return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=None, help="size index in the capacity family (default 12; 8 quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 2 quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nvme-dir", default=None, help="folder on the disk to offload to (default: a temp dir)")
    args = ap.parse_args(argv)
    k = args.k or (8 if args.quick else 12)
    steps = args.steps or (2 if args.quick else 5)
    root = Path(args.nvme_dir or tempfile.mkdtemp(prefix="loom-offload-"))
    try:
        offload = Engine(k, True, root / "run")
        compute = Engine(k, False, root / "none")
        offload.step()                                  # traces the order of use
        compute.step()
        _, read, written = offload.step()
        disk = RawDisk(root / "raw", offload.plugin.manager.chunk_bytes // 4096 * 4096, max(read, written))
        # Rounds of (offload step, raw disk for the bytes that step moved, compute-only step): the
        # three see the same state of a shared disk and a shared machine.
        rows = []
        for _ in range(steps):
            t_off, read, written = offload.step()
            t_disk = disk.time(read, written)
            t_comp, _, _ = compute.step()
            rows.append((t_off, t_disk, t_comp, read, written))
            print(json.dumps({"name": "offload_round", "offload_s": round(t_off, 3), "disk_s": round(t_disk, 3),
                              "compute_s": round(t_comp, 3), "read_gib": round(read / 2**30, 3),
                              "written_gib": round(written / 2**30, 3),
                              "ratio": round(t_off / max(t_disk, t_comp), 3)}), flush=True)
        disk.store.close()
        offload.store.close()
    finally:
        if args.nvme_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    med = [statistics.median(r[i] for r in rows) for i in range(3)]
    ratio = statistics.median(r[0] / max(r[1], r[2]) for r in rows)
    print(json.dumps({"name": "offload_efficiency", "value": round(ratio, 3), "unit": "x",
                      "offload_step_s": round(med[0], 3), "disk_only_s": round(med[1], 3),
                      "compute_only_s": round(med[2], 3), "bound": "disk" if med[1] >= med[2] else "compute",
                      "gib_moved_per_step": round((rows[-1][3] + rows[-1][4]) / 2**30, 2), "params": params_of(k),
                      "k": k, "rounds": steps, "target": 1.3, "machine": machine()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
