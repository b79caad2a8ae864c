"""From a model on the meta device to a generation engine: measure the machine, place the weights
and the KV cache (`core.inference.placement`), then make the weights in memory or as a stream.

    engine, placement = build_engine(meta_model, materialize, device, dtype, settings, ...)

`materialize(name, out)` writes parameter `name` into `out` (this rank's part of it under tensor
parallelism: `core.checkpoint.sharding.SplitDraw`): every parameter in place when the weights fit
on the device, chunk by chunk as they go to their home in host memory or on NVMe otherwise.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from core.checkpoint.sharding import make_meta_parameters
from core.errors import LoomError
from core.inference.engine import Engine
from core.inference.placement import Machine, ModelSize, Placement, plan
from core.inference.stream import WeightStream, plan_layers, smallest_budget
from core.memory.usage import host_room


@dataclass
class Settings:
    """The recipe keys a generation reads (`memory.*`, `parallel.offload`, `generate.*`)."""

    device_gb: float = 0.0            # weights held on the device; 0: what its free memory leaves
    offload: str = "auto"             # auto | none | cpu | nvme
    nvme_dir: str = ""
    chunk_mb: float = 32.0
    # 0: one reader where the file is read through the page cache (one sequential stream keeps the
    # kernel's read-ahead going: reading a cold 12 GB file here, 11 GB/s from one thread, 3 GB/s from
    # four sharing it), four for direct IO (which needs requests in flight instead)
    io_threads: int = 0
    micro_batches: int = 0            # 0: the placement picks
    kv: str = "auto"                  # auto | device | host
    # NVMe reads through the page cache, each read's pages dropped after it; true: direct IO. Measured
    # on this project's virtual disk (OPT-6.7B, 4 GiB cap): 1.15 tokens/s buffered, 0.62-0.82 direct
    direct_io: bool = False
    # intra-op threads of the new-token passes; 0: where weights stream on the CPU, all but one (the
    # readers' copies need a core: a decode pass's matrix products are bound by memory, not cores)
    decode_threads: int = 0


def measure_machine(device: torch.device, dtype: torch.dtype, settings: Settings, disk: bool) -> Machine:
    """This machine's rates, measured in about a second (matmul FLOP/s, memory and, with `disk`, the
    NVMe folder's read speed: a 256 MiB file written and read)."""
    from core.autoparallel.calibrate import disk_gbs, layer_overhead_us, matmul_tflops, memory_gbs

    cpu = device.type == "cpu"
    if cpu:
        device_bytes = int(host_room() * 0.85)
    else:
        free, _ = torch.cuda.mem_get_info(device)
        device_bytes = int(free * 0.9)
    flops = matmul_tflops(device, dtype, 512) * 1e12
    bandwidth = memory_gbs(device) * 1e9 / 2              # copy moves each byte twice
    read = math.inf
    if disk:
        folder = Path(settings.nvme_dir or tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        # 256 MiB: a 64 MiB file read in 0.01-0.02 s here gave 4.9-6.4 GB/s, the kernel's read-ahead
        # not yet at its stride; 256 and 512 MiB gave 8.4-8.8, what the stream's one reader gets
        read = disk_gbs(folder, 256)[1] * 1e9
    link = math.inf
    if not cpu:
        host = torch.empty(2**26, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty_like(host, device=device)
        dev.copy_(host)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(4):
            dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        link = 4 * host.numel() / (time.perf_counter() - t0)
    return Machine(device_bytes=device_bytes, host_bytes=int(host_room() * 0.85), flops=flops,
                   memory_bw=bandwidth, disk_read=read, host_link=link, cpu_only=cpu,
                   layer_seconds=layer_overhead_us(device) * 1e-6)


def model_size(model: nn.Module, layers, dtype: torch.dtype, chunk_mb: float) -> ModelSize:
    chunk_numel = max(1, int(chunk_mb * 2**20 / dtype.itemsize))
    sizes, per_layer, _, _ = plan_layers(model, layers, chunk_numel, dtype)
    shape = model.inference_shape()
    params = sum(p.numel() for p in model.parameters())                  # this rank's
    parts = getattr(getattr(model, "mode", None), "size", 1)
    return ModelSize(weight_bytes=sum(sizes), min_budget=smallest_budget(sizes, per_layer),
                     params=params, layers=shape["layers"], width=shape["width"], kv_width=shape["kv_width"] // parts,
                     vocab=shape["vocab"], element=dtype.itemsize)


def build_engine(meta_model: nn.Module, materialize: Callable[[str, torch.Tensor], None],
                 device: torch.device, dtype: torch.dtype, settings: Settings,
                 batch: int, prompt: int, new_tokens: int, rows: int,
                 machine: Machine | None = None) -> tuple[Engine, Placement]:
    layers = meta_model.inference_layers()
    size = model_size(meta_model, layers, dtype, settings.chunk_mb)
    if settings.kv not in ("auto", "device", "host"):
        raise LoomError(f"generate.kv: got {settings.kv!r}; allowed: auto, device, host")
    if machine is None:
        # the disk is timed only where it may be used: named, or the weights exceed the free memory
        free = host_room() if device.type == "cpu" else torch.cuda.mem_get_info(device)[0]
        disk = settings.offload == "nvme" or (settings.offload == "auto" and size.weight_bytes > 0.85 * free)
        machine = measure_machine(device, dtype, settings, disk=disk)
    budget = int(settings.device_gb * 2**30) if settings.device_gb > 0 else None
    placement = plan(size, machine, batch, prompt, new_tokens, rows, settings.offload, settings.micro_batches, budget)
    if settings.kv != "auto" and device.type != "cpu":
        placement.kv = settings.kv
    kv_device = device if placement.kv == "device" else torch.device("cpu")
    release = getattr(meta_model, "release_source", lambda: None)
    if placement.weights == "device":
        meta_model.to(dtype=dtype)             # on meta: free; each weight is then made in its final dtype
        make_meta_parameters(meta_model, materialize)
        release()
        for p in meta_model.parameters():
            p.requires_grad_(False)
        model = meta_model.to(device=device)
        return Engine(model, device, kv_device=kv_device, layers=layers), placement
    base = Path(settings.nvme_dir or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    nvme_dir = tempfile.mkdtemp(prefix="loom-generate-", dir=base)      # scratch; deleted on close
    stream = WeightStream(meta_model, layers, placement.weights, placement.weight_budget, dtype, device,
                          settings.chunk_mb, nvme_dir, settings.io_threads or (4 if settings.direct_io else 1),
                          materialize, direct=settings.direct_io)
    release()
    threads = settings.decode_threads
    if threads == 0 and device.type == "cpu":
        threads = max(1, torch.get_num_threads() - 1)
    return Engine(meta_model, device, stream=stream, kv_device=kv_device, layers=layers,
                  decode_threads=threads), placement
