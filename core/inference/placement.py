"""Where a generation keeps its weights and KV cache, and how many micro-batches share a weight pass.

A small cost model in the spirit of FlexGen's (Sheng et al. 2023), over the choices Loom has:

- weights on the device (they fit), streamed from host memory, or streamed from NVMe;
- the KV cache on the device, or on the host (a GPU's memory then holds more weights);
- N micro-batches of `batch` rows through each layer while its weights are resident.

A pass (one token step of every row of a group) reads the weights the device budget cannot keep
(with the chunk manager's cyclic eviction, what fits beyond two layers' worth stays put) and
computes `2 x parameters` FLOPs per row and token, reads the resident weights from the device's
memory, and pays a fixed cost per layer and micro-batch; reading overlaps computing, so a pass takes
the longer of the two (their sum when the budget cannot hold two layers: nothing is read ahead),
plus reading the KV cache across the host link where it lives on the host.
The first pass of a group reads the prompts whole. Tokens/s = rows x new tokens / time, and N is
the one that predicts most, or the smallest within 2% of it (less memory, same speed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from core.errors import LoomError
from core.inference.stream import gib_up
from core.memory.manager import human


@dataclass
class ModelSize:
    weight_bytes: int            # every weight once, in the generation's dtype, as packed in chunks
    min_budget: int              # the largest layer's chunks (core.inference.stream.smallest_budget)
    params: int
    layers: int
    width: int
    kv_width: int
    vocab: int
    element: int                 # bytes per value


@dataclass
class Machine:
    device_bytes: int            # memory free on the compute device (on a CPU-only machine: the host's)
    host_bytes: int              # host memory it may use (for weights streamed from the host)
    flops: float                 # FLOP/s at the generation's dtype
    memory_bw: float             # bytes/s the device reads its own memory at
    disk_read: float             # bytes/s, sequential reads of the NVMe folder
    host_link: float             # bytes/s host -> device (inf when the device is the host)
    cpu_only: bool
    layer_seconds: float = 0.0   # the fixed cost of running one layer once (kernel launches, Python)

    def describe(self) -> str:
        link = "" if self.cpu_only else f", host link {self.host_link / 1e9:.3g} GB/s"
        return (f"device {human(self.device_bytes)} free, {self.flops / 1e9:.3g} GFLOP/s, memory "
                f"{self.memory_bw / 1e9:.3g} GB/s, disk {self.disk_read / 1e9:.3g} GB/s{link}")


@dataclass
class Placement:
    weights: str                 # "device", "host" or "nvme"
    kv: str                      # "device" or "host"
    micro_batches: int
    weight_budget: int           # bytes of weights the device holds at once
    tokens_per_second: float     # predicted
    read_per_pass: int           # bytes of weights read per pass
    pass_seconds: float          # predicted, a decode pass
    kv_bytes: int
    activation_bytes: int
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        weights = ("weights on the device" if self.weights == "device" else
                   f"weights streamed from {self.weights} through {human(self.weight_budget)} on the device "
                   f"({human(self.read_per_pass)} read per token step)")
        return (f"{weights}; KV cache on the {self.kv} ({human(self.kv_bytes)}); micro_batches={self.micro_batches}; "
                f"predicted {self.tokens_per_second:.3g} tokens/s")


def activation_bytes(size: ModelSize, batch: int, prompt: int) -> int:
    """A micro-batch's largest temporaries, in its prefill: the block's activations (about 16 x width
    values per token, the MLP's four-wide hidden layer included), the attention scores (heads of
    64) and the last position's fp32 logits."""
    heads = max(1, size.width // 64)
    return int(batch * prompt * 16 * size.width * size.element + 2 * batch * heads * prompt * prompt * 4
               + batch * size.vocab * 4)


def plan(size: ModelSize, machine: Machine, batch: int, prompt: int, new_tokens: int, rows: int,
         offload: str = "auto", micro_batches: int = 0, weight_budget: int | None = None,
         setting: str = "memory.device_gb") -> Placement:
    """The placement predicted fastest. `weight_budget` (memory.device_gb): bytes of weights the
    device may hold (default: what its free memory leaves beside the cache and activations);
    `offload` ("auto", "none", "cpu", "nvme") and a positive `micro_batches` fix those choices.
    Refuses, naming the smallest budget that would run, when not even one micro-batch fits."""
    if offload not in ("auto", "none", "cpu", "nvme"):
        raise LoomError(f"parallel.offload: got {offload!r}; allowed: auto, none, cpu, nvme")
    if weight_budget is not None and weight_budget < size.min_budget and offload != "none":
        raise LoomError(f"{setting}={weight_budget / 2**30:g} cannot hold even one layer's weights "
                        f"({human(size.min_budget)}): the smallest budget that runs is {setting}="
                        f"{gib_up(size.min_budget)} (weights streamed from host or NVMe; about twice that lets "
                        f"reading overlap computing)")
    kv_row = 2 * size.layers * size.kv_width * size.element * (prompt + new_tokens)
    act = activation_bytes(size, batch, prompt)
    most = max(1, math.ceil(rows / batch))
    counts = [micro_batches] if micro_batches > 0 else list(range(1, most + 1))
    options: list[Placement] = []
    lost: list[str] = []
    wheres = {"none": ["device"], "cpu": ["host"], "nvme": ["nvme"]}.get(offload)
    if wheres is None:
        wheres = ["device"] + ([] if machine.cpu_only else ["host"]) + ["nvme"]
    free = machine.device_bytes
    for where in wheres:
        if where == "host" and size.weight_bytes > machine.host_bytes:
            lost.append(f"weights from host memory: {human(size.weight_bytes)} exceed the host's "
                        f"{human(machine.host_bytes)}")
            continue
        for n in counts:
            kv = min(rows, n * batch) * kv_row
            for kv_at in ("device", "host") if not machine.cpu_only else ("device",):
                on_device = act + (kv if kv_at == "device" else 0)
                what = f"weights {'on the device' if where == 'device' else 'from ' + where}, N={n}, KV on the {kv_at}"
                budget = free - on_device if weight_budget is None else min(weight_budget, size.weight_bytes)
                if where == "device":
                    budget = size.weight_bytes
                elif budget < size.min_budget:
                    lost.append(f"{what}: {human(max(budget, 0))} left for weights, one layer needs "
                                f"{human(size.min_budget)}")
                    continue
                if on_device + min(budget, size.weight_bytes) > free or (
                        where == "device" and weight_budget is not None and weight_budget < size.weight_bytes):
                    lost.append(f"{what}: {human(min(budget, size.weight_bytes))} of weights and {human(on_device)} "
                                f"of cache and activations exceed the device's {human(free)}"
                                + (f" or {setting}" if weight_budget is not None else ""))
                    continue
                if where == "device":
                    read, link = 0, math.inf
                else:
                    budget = min(budget, size.weight_bytes)
                    kept = max(0, budget - 2 * size.min_budget) if budget < size.weight_bytes else size.weight_bytes
                    read = size.weight_bytes - kept
                    link = machine.disk_read if where == "nvme" else machine.host_link

                def pass_time(per_row: int, tokens: int) -> float:
                    # the prompts go through a layer a micro-batch at a time; a new-token pass runs the
                    # micro-batches as one batch where their cache is on the device (core.inference.engine)
                    calls = 1 if per_row == 1 and kv_at == "device" else n
                    compute = (2 * size.params * tokens * per_row / machine.flops
                               + size.weight_bytes / machine.memory_bw
                               + (size.layers + 2) * calls * machine.layer_seconds)
                    kv_move = kv / machine.host_link if kv_at == "host" else 0.0
                    if read and budget < 2 * size.min_budget:    # no room to read the next layer meanwhile
                        return compute + read / link + kv_move
                    return max(compute, read / link) + kv_move

                # the prompts go in groups of N micro-batches; the last group may be smaller, and
                # costs nearly as much when the weights' reading sets the pace
                groups = [n * batch] * (rows // (n * batch)) + ([rows % (n * batch)] if rows % (n * batch) else [])
                total = sum(pass_time(prompt, g) + (new_tokens - 1) * pass_time(1, g) for g in groups)
                options.append(Placement(where, kv_at, n, budget, rows * new_tokens / total, read,
                                         pass_time(1, groups[0]), kv, act))
    if not options:
        one = act + batch * kv_row
        if offload == "none":
            raise LoomError(f"the weights ({human(size.weight_bytes)}) and one micro-batch's cache and activations "
                            f"({human(one)}) do not fit the device's {human(free)} free with parallel.offload=none; "
                            f"stream them (parallel.offload=nvme or cpu) or lower --batch-size")
        raise LoomError(f"the device has {human(free)} free, but one layer's weights ({human(size.min_budget)}) and "
                        f"one micro-batch's cache and activations ({human(one)}) need {human(size.min_budget + one)}; "
                        f"lower --batch-size or the prompt and new-token lengths")
    best = max(o.tokens_per_second for o in options)
    chosen = min((o for o in options if o.tokens_per_second >= 0.98 * best),
                 key=lambda o: (["device", "host", "nvme"].index(o.weights), o.micro_batches, o.kv != "device"))
    chosen.lines = [f"machine: {machine.describe()}",
                    f"model: {human(size.weight_bytes)} of weights, one layer {human(size.min_budget)}, KV cache "
                    f"{human(kv_row)} per row ({prompt} + {new_tokens} positions)",
                    f"chosen: {chosen.summary()}"]
    ranked = sorted(options, key=lambda o: -o.tokens_per_second)
    for o in ranked[:8]:
        if o is chosen:
            continue
        why = ("slower" if o.tokens_per_second < chosen.tokens_per_second else "as fast, but uses more memory or "
               "reads more")
        chosen.lines.append(f"  {o.weights:>6} weights, KV on {o.kv:<6}, N={o.micro_batches:<3} "
                            f"{o.tokens_per_second:8.3g} tokens/s ({why})")
    for reason in lost[:6]:
        chosen.lines.append(f"  does not fit: {reason}")
    return chosen

