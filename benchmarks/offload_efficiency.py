"""How close NVMe offload comes to the better of its two bounds: compute alone, and the disk alone.

    python -m benchmarks.offload_efficiency            # GPT k=12 of the capacity family (91 M parameters)
    python -m benchmarks.offload_efficiency --quick    # k=8 (29 M), 2 timed steps

Three measurements in one process, on the same model and tokens:

1. offload: the gemini plugin with `parallel.offload=nvme`, a device budget of a quarter of the
   parameters (so parameters stream in every forward and backward, and every optimizer state
   lives only on disk), steps inside backward. One warm-up step traces the order of use; the
   next steps are timed, and the bytes the NVMe store read and wrote are counted.
2. compute: the same engine with nothing offloaded and no budget (every chunk and state in
   memory): the same kernels, no IO. Its step time is the compute bound.
3. disk: the bytes of one offloaded step, read and written through the same store (same
   O_DIRECT files, aligned buffers and IO threads) in chunk-sized requests, all in flight at
   once: the disk bound.

Prints JSON lines for each and `{"name": "offload_efficiency", "value": offload / max(compute,
disk)}`; 1.0 would mean perfect overlap of IO with compute (target: at most 1.3).
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
from core.booster import GeminiPlugin, ZeroPlugin
from core.config import MemoryConfig
from core.distributed import Layout, ParallelMesh
from core.memory.store import NVMeStore


def _run(k: int, steps: int, offload: bool, nvme_dir: Path) -> dict:
    torch.manual_seed(0)
    cfg = GPTModelConfig(**family(k))
    with torch.device("meta"):
        model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    largest = max(p.numel() for p in model.parameters())
    chunk_mb = largest * 4 / 2**20
    mesh = ParallelMesh.build(Layout())
    if offload:
        budget = params_of(k) * 4 / 4 / 2**30          # a quarter of the fp32 parameters
        memory = MemoryConfig(chunk_mb=chunk_mb, device_gb=budget, io_threads=2, prefetch=2, step_in_backward=True)
        plugin = GeminiPlugin(mesh, "fp32", stage=3, offload="nvme", memory=memory, nvme_dir=nvme_dir,
                              materialize=model.init_parameter)
    else:
        memory = MemoryConfig(chunk_mb=chunk_mb, step_in_backward=True)
        plugin = ZeroPlugin(mesh, "fp32", stage=1, memory=memory, materialize=model.init_parameter)
    wrapped, chunk_opt = plugin.configure(model, opt)
    tokens = torch.randint(0, VOCAB, (1, SEQ + 1), generator=torch.Generator().manual_seed(1))
    store = plugin.manager.home if offload else None
    times, read, written = [], 0, 0
    for step in range(steps + 1):
        r0, w0 = (store.bytes_read, store.bytes_written) if store else (0, 0)
        t = time.perf_counter()
        logits = wrapped(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        chunk_opt.backward(loss)
        chunk_opt.step()
        chunk_opt.zero_grad()
        if step > 0:     # step 0 traces the order of use
            times.append(time.perf_counter() - t)
            if store:
                read += store.bytes_read - r0
                written += store.bytes_written - w0
    out = {"step_s": statistics.median(times), "steps": steps, "chunks": len(plugin.manager.chunks),
           "chunk_mib": round(plugin.manager.chunk_bytes / 2**20, 1)}
    if offload:
        out.update(read_per_step=read // steps, written_per_step=written // steps,
                   prefetch_hits=plugin.manager.stats.prefetch_hits, fetches=plugin.manager.stats.fetches)
        store.close()
    return out


def _disk_time(nvme_dir: Path, read: int, written: int, chunk_bytes: int, threads: int = 2) -> float:
    """Seconds to write `written` and read `read` bytes through an NVMeStore like the run's."""
    n_w, n_r = max(1, -(-written // chunk_bytes)), max(1, -(-read // chunk_bytes))
    count = max(n_w, n_r)
    store = NVMeStore(nvme_dir / "raw", {"a": (count, chunk_bytes), "b": (count, chunk_bytes)}, threads=threads)
    buf = torch.ones(chunk_bytes // 4)
    for i in range(n_r):                    # the read side reads data that exists (not holes)
        store.write("b", i, buf)
    outs = [torch.empty(chunk_bytes // 4) for _ in range(min(n_r, 4))]
    t = time.perf_counter()
    futures = [store.write_async("a", i, buf) for i in range(n_w)]
    futures += [store.read_async("b", i, outs[i % len(outs)]) for i in range(n_r)]
    for f in futures:
        f.result()
    elapsed = time.perf_counter() - t
    store.close()
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=None, help="size index in the capacity family (default 12; 8 quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 4; 2 quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nvme-dir", default=None, help="folder on the disk to offload to (default: a temp dir)")
    args = ap.parse_args(argv)
    k = args.k or (8 if args.quick else 12)
    steps = args.steps or (2 if args.quick else 4)
    root = Path(args.nvme_dir or tempfile.mkdtemp(prefix="loom-offload-"))
    try:
        offload = _run(k, steps, True, root / "run")
        print(json.dumps({"name": "offload_step", "value": round(offload["step_s"], 3), "unit": "s", **offload}))
        compute = _run(k, steps, False, root / "none")
        print(json.dumps({"name": "compute_only_step", "value": round(compute["step_s"], 3), "unit": "s"}))
        disk = _disk_time(root, offload["read_per_step"], offload["written_per_step"],
                          int(offload["chunk_mib"] * 2**20) // 4096 * 4096)
        print(json.dumps({"name": "disk_only_step", "value": round(disk, 3), "unit": "s",
                          "gib_per_step": round((offload["read_per_step"] + offload["written_per_step"]) / 2**30, 2)}))
    finally:
        if args.nvme_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    bound = max(compute["step_s"], disk)
    print(json.dumps({"name": "offload_efficiency", "value": round(offload["step_s"] / bound, 3), "unit": "x",
                      "params": params_of(k), "k": k, "bound": "compute" if compute["step_s"] >= disk else "disk",
                      "target": 1.3, "machine": machine()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
