"""`python -m core.plan calibrate`: measure this machine and write its cluster file.

What it measures, each with the real thing the planner's cost model stands for:

- matrix-product FLOP/s per precision on the compute device (square products the size of a small
  model's layers; the best of a few runs), with all `--devices` processes computing at once (on a
  CPU-only machine they share its cores, as a run's ranks do);
- all-reduce bandwidth and latency among `--devices` processes on this machine with the backend
  the runs use (gloo on CPUs, NCCL on GPUs), from a large and a tiny all-reduce; and the time by
  size of an all-reduce, a reduce-scatter, an all-gather, a ring exchange and an all-to-all (the
  tables the cost model prices collectives inside a node with);
- the host <-> device link (on GPUs; on a CPU-only machine the device is the host: a memory copy);
- NVMe (the folder `--nvme-dir`, default the system's temporary folder): a file written with
  fsync and read back, and the free space there;
- host memory (`/proc/meminfo`), and the Adam updates per second the host's CPUs make;
- a layer's fixed cost per pass (a tiny transformer layer's forward and backward on one token), and
  the device memory's copy bandwidth (all processes at once).

On a CPU-only machine the "devices" are the processes a run starts (`--devices`, default the
number of cores) and each one's memory is what `--device-memory-gb` allows (default: the host's
memory shared among them), as the per-rank caps of the benchmarks set it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core.autoparallel.cluster import Cluster


def _best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def run():
        for _ in range(4):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    return 4 * 2 * n ** 3 / _best_of(run) / 1e12


def layer_overhead_us(device: torch.device) -> float:
    """The fixed cost of one pass through a transformer layer: a tiny one (width 32, one token)
    forward and backward, where the arithmetic is nothing and the kernels' own cost is all."""
    layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True).to(device)
    x = torch.randn(1, 1, 32, device=device, requires_grad=True)

    def run():
        for _ in range(20):
            layer(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    return _best_of(run) / 20 / 3 * 1e6           # forward + backward: three passes' worth


def host_memory_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 16.0


def disk_gbs(folder: Path, mb: int) -> tuple[float, float]:
    """(write, read) GB/s of a file of `mb` MiB in `folder`, written with fsync, read back with the
    page cache dropped for it where the system allows (posix_fadvise)."""
    data = os.urandom(2**20) * mb
    with tempfile.NamedTemporaryFile(dir=folder, prefix="loom-calibrate-") as f:
        t0 = time.perf_counter()
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        write = len(data) / (time.perf_counter() - t0) / 1e9
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        with open(f.name, "rb", buffering=0) as g:
            while g.read(2**24):
                pass
        read = len(data) / (time.perf_counter() - t0) / 1e9
    return write, read


def adam_gparams(numel: int) -> float:
    """Adam updates per second (x10^9) of torch's CPU AdamW on this host, all its threads."""
    p = torch.nn.Parameter(torch.zeros(numel))
    p.grad = torch.ones(numel)
    opt = torch.optim.AdamW([p], foreach=True)
    opt.step()
    return numel / _best_of(opt.step) / 1e9


def memory_gbs(device: torch.device) -> float:
    """Copy bandwidth of the device's memory (read + write of 64 MiB)."""
    x = torch.empty(2**26, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)

    def run():
        y.copy_(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    return 2 * x.numel() / _best_of(run) / 1e9


def _device_rates(device: torch.device, n: int) -> tuple[dict, float, float]:
    """Matrix-product TFLOP/s per precision, a layer's fixed cost (us) and memory GB/s on `device`."""
    tflops = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        size = n if dtype == torch.float32 or device.type == "cuda" else max(128, n // 4)   # slow on CPUs
        tflops[name] = round(matmul_tflops(device, dtype, size), 4)
    return tflops, layer_overhead_us(device), memory_gbs(device)


EXCHANGE_SIZES = (1, 2**10, 2**13, 2**16, 2**19)      # values (fp32) a ring exchange or an all-to-all moves


def _rank_measure(rank: int, world: int, port: int, n: int, sizes: list[int], backend: str, out: str) -> None:
    """One of `world` processes measuring at once, as a run's processes compute at once (on a
    CPU-only machine they share its cores): the rates, then all-reduce times per size."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    dist.barrier()
    rates = _device_rates(device, n)
    dist.barrier()
    times, scatters, gathers = [], [], []
    for numel in sizes:
        numel = -(-numel // world) * world
        x = torch.ones(numel, device=device)
        part = torch.empty(numel // world, device=device)
        for op, into in ((lambda: dist.all_reduce(x), times),
                        (lambda: dist.reduce_scatter_tensor(part, x), scatters),
                        (lambda: dist.all_gather_into_tensor(x, part), gathers)):
            op()

            def run():
                for _ in range(5):
                    op()
                if device.type == "cuda":
                    torch.cuda.synchronize()

            into.append((numel, _best_of(run) / 5))
    # what sequence parallelism and pipelines call, by size: a ring exchange (send on, receive
    # from behind) and an all-to-all (`numel` values handed in, an equal part to each rank)
    exchanges, swaps = [], []
    for numel in EXCHANGE_SIZES:
        numel = -(-numel // world) * world
        one = torch.ones(numel, device=device)
        back = torch.empty_like(one)
        part = numel // world

        def ring():
            for _ in range(5):
                works = [dist.isend(one, (rank + 1) % world), dist.irecv(back, (rank - 1) % world)]
                for w in works:
                    w.wait()

        def swap():
            for _ in range(5):
                dist.all_to_all(list(back.split(part)), list(one.split(part)))

        ring()
        swap()
        exchanges.append((numel, _best_of(ring) / 5))
        swaps.append((numel, _best_of(swap) / 5))
    times = (times, exchanges, swaps, scatters, gathers)
    if rank == 0:
        torch.save((rates, times), out)
    dist.destroy_process_group()


def measure_ranks(world: int, backend: str, n: int, big: int) -> tuple:
    """(TFLOP/s per precision, layer cost us, memory GB/s, all-reduce GB/s per rank, its latency s, a ring
    exchange's and an all-to-all's latency s, and [bytes, us] tables by size of the all-reduce, the
    ring exchange, the all-to-all, the reduce-scatter and the all-gather) with `world`
    processes running at once; the bandwidth is the ring formula's 2 (k - 1) / k x bytes over the
    large all-reduce's time less the tiny one's, which is the latency. The table keeps the sizes
    between: a mid-sized all-reduce costs more than the two-point line says (gloo's ring pays a
    latency per step)."""
    import torch.multiprocessing as mp

    from core.distributed.testing import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "measured.pt")
        sizes = sorted({1, 2**8, 2**11, 2**14, 2**17, 2**20, big})
        mp.spawn(_rank_measure, args=(world, free_port(), n, sizes, backend, out), nprocs=world)
        (tflops, overhead, mem), measured = torch.load(out)
    (_, tiny_s), (big, big_s) = measured[0][0], measured[0][-1]
    ring_s, swap_s = measured[1][0][1], measured[2][0][1]
    wire = 2 * (world - 1) / world * big * 4
    # all-reduce, ring exchange, all-to-all, reduce-scatter, all-gather
    tables = [[[numel * 4, round(t * 1e6, 1)] for numel, t in pairs] for pairs in measured]
    return tflops, overhead, mem, wire / max(big_s - tiny_s, 1e-9) / 1e9, tiny_s, ring_s, swap_s, tables


def calibrate(devices: int, device_memory_gb: float, nvme_dir: Path, quick: bool = False,
              say=lambda line: print(line, file=sys.stderr)) -> Cluster:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    n = 512 if quick else (4096 if gpu else 1024)
    backend = "nccl" if gpu else "gloo"
    big = 2**20 if quick else 2**23
    if devices > 1:
        tflops, overhead, mem, bw, latency, ring_s, swap_s, tables = measure_ranks(devices, backend, n, big)
        say(f"all-reduce over {devices} {backend} processes: {bw:.3g} GB/s per rank, {latency * 1e6:.0f} us a call; "
            f"a ring exchange {ring_s * 1e6:.0f} us, an all-to-all {swap_s * 1e6:.0f} us")
        for what, table in zip(("all-reduce", "ring exchange", "all-to-all", "reduce-scatter", "all-gather"), tables):
            say(f"{what} by size: " + ", ".join(f"{b / 2**10:g} KiB {t / 1e3:.3g} ms" for b, t in table))
    else:
        tflops, overhead, mem = _device_rates(device, n)
        bw, latency, ring_s, swap_s, tables = 100.0, 1e-5, 1e-5, 1e-5, [[], [], [], [], []]
    for name, rate in tflops.items():
        say(f"matrix products ({name}, {n} x {n}, {devices} processes at once): {rate:g} TFLOP/s each")
    say(f"a layer's fixed cost per pass: {overhead:.0f} us; memory {mem:.3g} GB/s")
    host = host_memory_gb()
    write, read = disk_gbs(nvme_dir, 64 if quick else 512)
    free = _free_gb(nvme_dir)
    say(f"disk at {nvme_dir}: write {write:.3g} GB/s, read {read:.3g} GB/s, {free:,.0f} GiB free")
    adam = adam_gparams(2**22 if quick else 2**24)
    say(f"host Adam: {adam:.3g} x10^9 parameters/s")
    if gpu:
        x = torch.empty(2**26, dtype=torch.uint8).pin_memory()
        y = torch.empty_like(x, device="cuda")
        link = x.numel() / _best_of(lambda: (y.copy_(x), torch.cuda.synchronize())) / 1e9
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    else:
        x = torch.empty(2**26, dtype=torch.uint8)
        y = torch.empty_like(x)
        link = x.numel() / _best_of(lambda: y.copy_(x)) / 1e9
        name = f"processes on {os.cpu_count()} CPU cores"
        memory = device_memory_gb or host / devices
    return Cluster(name=f"this machine: {devices} {name}", nodes=1, devices_per_node=devices,
                   device_memory_gb=round(memory, 3), host_memory_gb=round(host, 1), nvme_gb=round(free, 1),
                   nvme_read_gbs=round(read, 3), nvme_write_gbs=round(write, 3), host_link_gbs=round(link, 3),
                   host_adam_gparams=round(adam, 4), intra_node_gbs=round(bw, 4),
                   intra_node_latency_us=round(latency * 1e6, 1), inter_node_gbs=round(bw, 4),
                   inter_node_latency_us=round(latency * 1e6, 1), tflops=tflops,
                   layer_overhead_us=round(overhead, 1), memory_gbs=round(mem, 3),
                   p2p_latency_us=round(ring_s * 1e6, 1), all_to_all_latency_us=round(swap_s * 1e6, 1),
                   all_reduce_us=tables[0], exchange_us=tables[1], all_to_all_us=tables[2],
                   reduce_scatter_us=tables[3], all_gather_us=tables[4],
                   device_is_host=not gpu, host_cores=0 if gpu else len(os.sched_getaffinity(0)))


def _free_gb(folder: Path) -> float:
    import shutil

    return shutil.disk_usage(folder).free / 2**30


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.plan calibrate",
                                 description="Measure this machine and write its cluster file.")
    ap.add_argument("--out", default="cluster.yaml", help="where to write it (default cluster.yaml)")
    ap.add_argument("--devices", type=int, default=0,
                    help="processes a run starts here (default: GPUs, or CPU cores on a CPU-only machine)")
    ap.add_argument("--device-memory-gb", type=float, default=0.0,
                    help="CPU only: memory each process may use (default: host memory / devices)")
    ap.add_argument("--nvme-dir", default=tempfile.gettempdir(), help="the disk offload would use")
    ap.add_argument("--quick", action="store_true", help="smaller measurements (seconds, less exact)")
    args = ap.parse_args(argv)
    devices = args.devices or (torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1)
    cluster = calibrate(devices, args.device_memory_gb, Path(args.nvme_dir), args.quick)
    Path(args.out).write_text(f"# measured by python -m core.plan calibrate on {time.strftime('%Y-%m-%d %H:%M')}\n"
                              + cluster.to_yaml())
    print(f"wrote {args.out}: {cluster.describe()}", file=sys.stderr)
    return 0
