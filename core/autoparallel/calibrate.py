"""`python -m core.plan calibrate`: measure this machine and write its cluster file.

What it measures, each with the real thing the planner's cost model stands for:

- matrix-product FLOP/s per precision on the compute device (square products the size of a small
  model's layers; the best of a few runs), with all `--devices` processes computing at once (on a
  CPU-only machine they share its cores, as a run's ranks do);
- all-reduce bandwidth and latency among `--devices` processes on this machine with the backend
  the runs use (gloo on CPUs, NCCL on GPUs), from a large and a tiny all-reduce; and the time by
  size of an all-reduce, a reduce-scatter, an all-gather, a ring exchange and an all-to-all for
  each group size (2, 4, ... all the processes: the processes cut into groups, every group
  calling at once, as tensor-, sequence- and data-parallel groups do; the tables the cost model
  prices collectives inside a node with). Each is the mean of many calls, not the best: processes
  sharing a CPU's cores are descheduled in the middle of a call, and a run pays for it. The
  all-reduce, reduce-scatter and all-gather are timed after a computation, as a run calls them
  (each then waits for its group's last process), the exchange and all-to-all back to back, as
  sequence parallelism calls them; a table is made nondecreasing in the size (what says a larger
  message costs less is noise);
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


def group_sizes(world: int) -> list[int]:
    """The group sizes calibration measures collectives for: 2, 4, 8 ... up to `world`, and `world`."""
    sizes, k = [], 2
    while k < world:
        if world % k == 0:
            sizes.append(k)
        k *= 2
    return sizes + [world] if world > 1 else []


def _reps(nbytes: int) -> int:
    """Calls to time of a collective of `nbytes` (the same on every process): 30 up to 4 MiB, fewer
    past it (at least 5)."""
    return max(5, min(30, round(30 * 2**22 / max(nbytes, 1))))


def _after_work_s(op, work, sync, reps: int) -> float:
    """Mean seconds of `op` where a run meets it: after a computation (`work`, not counted), so
    that each call waits for the last process of its group to arrive, as a collective between two
    layers does (processes sharing a CPU's cores arrive milliseconds apart)."""
    op()
    total = 0.0
    for _ in range(reps):
        work()
        sync()
        t0 = time.perf_counter()
        op()
        sync()
        total += time.perf_counter() - t0
    return total / reps


def _mean_s(op, sync, reps: int) -> float:
    """Mean seconds of `op` over `reps` calls back to back (after one not timed). The mean, not the
    best: processes that share a CPU's cores are descheduled in the middle of a call, and a run
    pays for that every time (the best of five calls came to about half the mean here)."""
    op()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        op()
    sync()
    return (time.perf_counter() - t0) / reps


def nondecreasing(times: list[float]) -> list[float]:
    """The closest nondecreasing sequence (least squares: adjacent violators pooled into their
    mean) to times measured by increasing size: a larger message never costs less, and what says
    otherwise is the noise of processes sharing cores."""
    blocks: list[list[float]] = []                     # [sum, count] of pooled runs
    for t in times:
        blocks.append([t, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(count)]


def _rank_measure(rank: int, world: int, port: int, n: int, sizes: list[int], backend: str, out: str) -> None:
    """One of `world` processes measuring at once, as a run's processes compute at once (on a
    CPU-only machine they share its cores): the rates, then the collectives' times by size and
    group size (the world cut into groups of k consecutive ranks, every group calling at once, as
    tensor-, sequence- and data-parallel groups do). The all-reduce, reduce-scatter and all-gather
    each call after a computation: a run calls them one at a time between computations (a
    tensor-parallel layer's, a chunk's backward, DDP's buckets). The ring exchange and the
    all-to-all back to back: sequence parallelism calls them in runs (a ring's hops, the query, key
    and value swapped together)."""
    # the calls the chunked engine makes (the single-tensor all-gather and reduce-scatter)
    from core.distributed.comm import _gather_single as gather_single, _scatter_single as scatter_single

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    dist.barrier()
    rates = _device_rates(device, n)
    dist.barrier()

    a = torch.randn(n // 2, n, device=device)
    b = torch.randn(n, n // 2, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def work():                                      # a layer's arithmetic between two collectives
        torch.mm(a, b)

    by_group = {}
    for k in group_sizes(world):
        ranks = [list(range(g, g + k)) for g in range(0, world, k)]
        groups = [dist.new_group(r) if k < world else dist.group.WORLD for r in ranks]
        group, first = groups[rank // k], rank // k * k
        times, scatters, gathers = [], [], []
        for numel in sizes:
            numel = -(-numel // k) * k
            x = torch.ones(numel, device=device)
            part = torch.empty(numel // k, device=device)
            for op, into in ((lambda: dist.all_reduce(x, group=group), times),
                             (lambda: scatter_single(part, x, group=group), scatters),
                             (lambda: gather_single(x, part, group=group), gathers)):
                into.append((numel, _after_work_s(op, work, sync, max(4, _reps(4 * numel) // 3))))
        # what sequence parallelism and pipelines call, by size: a ring exchange (send on, receive
        # from behind, within the group) and an all-to-all (`numel` values handed in, an equal part
        # to each rank of the group)
        exchanges, swaps = [], []
        ahead, behind = first + (rank - first + 1) % k, first + (rank - first - 1) % k
        for numel in EXCHANGE_SIZES:
            numel = -(-numel // k) * k
            one = torch.ones(numel, device=device)
            back = torch.empty_like(one)
            part = numel // k

            def ring():
                works = [dist.isend(one, ahead), dist.irecv(back, behind)]
                for w in works:
                    w.wait()

            exchanges.append((numel, _mean_s(ring, sync, _reps(4 * numel))))
            swaps.append((numel, _mean_s(lambda: dist.all_to_all(list(back.split(part)), list(one.split(part)),
                                                                  group=group), sync, _reps(4 * numel))))
        by_group[k] = (times, scatters, gathers, exchanges, swaps)
    # each process's own means, averaged over the processes: what a collective costs a rank
    flat = [t for k in sorted(by_group) for table in by_group[k] for _, t in table]
    mean = torch.tensor(flat, dtype=torch.float64)
    dist.all_reduce(mean)
    mean = iter((mean / world).tolist())
    by_group = {k: tuple([(numel, next(mean)) for numel, _ in table] for table in by_group[k])
                for k in sorted(by_group)}
    if rank == 0:
        torch.save((rates, by_group), out)
    dist.destroy_process_group()


def measure_ranks(world: int, backend: str, n: int, big: int) -> tuple:
    """(TFLOP/s per precision, layer cost us, memory GB/s, all-reduce GB/s per rank, its latency s, a ring
    exchange's and an all-to-all's latency s, and [bytes, us] tables by size for each group size
    ({k: table}) of the all-reduce, the ring exchange, the all-to-all, the reduce-scatter and the
    all-gather) with the processes running at once, each the mean of many calls, made
    nondecreasing in the size; the bandwidth is the ring formula's 2 (k - 1) / k x bytes over the
    large all-reduce's time less the tiny one's, which is the latency. The tables keep the sizes
    between: a mid-sized all-reduce costs more than the two-point line says (gloo's ring pays a
    latency per step)."""
    import torch.multiprocessing as mp

    from core.distributed.testing import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "measured.pt")
        sizes = sorted({1, 2**8, 2**11, 2**14, 2**17, 2**20, big})
        mp.spawn(_rank_measure, args=(world, free_port(), n, sizes, backend, out), nprocs=world)
        (tflops, overhead, mem), by_group = torch.load(out)
    whole = by_group[world][0]
    (_, tiny_s), (big, big_s) = whole[0], whole[-1]
    wire = 2 * (world - 1) / world * big * 4

    def table(pairs):
        return [[numel * 4, round(t * 1e6, 1)] for (numel, _), t in zip(pairs, nondecreasing([t for _, t in pairs]))]

    # all-reduce, ring exchange, all-to-all, reduce-scatter, all-gather
    tables = [{k: table(by_group[k][i]) for k in by_group} for i in (0, 3, 4, 1, 2)]
    return (tflops, overhead, mem, wire / max(big_s - tiny_s, 1e-9) / 1e9, tiny_s, by_group[world][3][0][1],
            by_group[world][4][0][1], tables)


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
            for k, pairs in table.items():
                say(f"{what} by size, groups of {k}: "
                    + ", ".join(f"{b / 2**10:g} KiB {t / 1e3:.3g} ms" for b, t in pairs))
    else:
        tflops, overhead, mem = _device_rates(device, n)
        bw, latency, ring_s, swap_s, tables = 100.0, 1e-5, 1e-5, 1e-5, [{} for _ in range(5)]
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
