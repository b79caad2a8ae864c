"""What the machines are: the cluster description the planner costs layouts against.

A cluster is a YAML file (`recipes/clusters/*.yaml` ships a few; `python -m core.plan calibrate`
measures this machine and writes one). Every figure is per node or per device as its name says;
bandwidths are in GB/s (10^9 bytes a second, one direction), memory in GiB, FLOP/s in TFLOP/s
of dense matrix products as they are reached (measured, or peak times a stated efficiency), not
the datasheet's peak.

    name: 8x A100-80GB
    nodes: 1
    devices_per_node: 8
    device_memory_gb: 80
    tflops: {fp32: 19.5, bf16: 230, fp16: 230}
    intra_node_gbs: 300

Unknown keys and impossible values are refused with the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.config import ConfigError, recipe_dirs

PRECISIONS = ("fp32", "bf16", "fp16")
ENGINE_FAMILIES = ("plain", "chunked", "tensor")


@dataclass(frozen=True)
class Cluster:
    name: str = "cluster"
    nodes: int = 1
    devices_per_node: int = 1
    device_memory_gb: float = 16.0         # what one device can hold (the planner keeps a reserve)
    host_memory_gb: float = 64.0           # per node, for offloaded parameters and optimizer states
    nvme_gb: float = 0.0                   # per node, free space for parallel.offload=nvme (0 = none)
    nvme_read_gbs: float = 2.0             # per node
    nvme_write_gbs: float = 1.0            # per node
    host_link_gbs: float = 16.0            # per device, device <-> host memory (PCIe)
    host_adam_gparams: float = 1.0         # parameters a node's CPUs update per second with Adam, x10^9
    intra_node_gbs: float = 100.0          # per device, to the devices of its own node
    intra_node_latency_us: float = 10.0    # one collective's fixed cost inside a node
    inter_node_gbs: float = 12.5           # per node, all its network links together
    inter_node_latency_us: float = 30.0    # one collective's fixed cost across nodes
    p2p_latency_us: float = 10.0           # one send-on / receive-from-behind exchange (ring attention, pipelines)
    all_to_all_latency_us: float = 10.0    # one all-to-all (all-to-all attention)
    tflops: dict = field(default_factory=lambda: {"fp32": 10.0, "bf16": 40.0, "fp16": 40.0})
    layer_overhead_us: float = 100.0       # fixed cost of one layer's forward or backward on one micro-batch
    memory_gbs: float = 1000.0             # device memory bandwidth (the elementwise work streams activations)
    runtime_gb: float = 0.0                # memory a training process holds beyond its model's (runtime,
    #                                        communication buffers, data): measured on a trivial model
    # what an engine holds beyond runtime_gb whatever the model ("chunked": the host Adam kernel
    # it loads; "tensor": what tensor parallelism's groups hold), added for each engine a layout
    # uses (a ZeRO layout with tensor parallelism: both): measured on a trivial model
    runtime_extra_gb: dict = field(default_factory=dict)
    graph_kb: float = 0.0                  # what autograd keeps per layer and micro-batch in flight beside
    #                                        the saved tensors (its graph's nodes), where the devices are
    #                                        the host's CPUs (on a GPU it is host memory)
    step_overhead_ms: float = 5.0          # fixed cost of one optimizer step (the loop, the update's launch)
    microbatch_overhead_ms: float = 1.0    # fixed cost of one micro-batch's forward and backward
    chunked_overhead_ms: float = 0.0       # what the chunked engine (ZeRO, offload) adds to a step
    offload_overlap: float = 1.2           # an offloaded step / max(its compute, its transfers), measured
    #                                        by benchmarks/offload_efficiency.py (1.21 on this project's CPU runs)
    memory_reserve: float = 0.9            # the fraction of each memory the planner may fill
    # measured by size among a node's devices, [payload bytes, microseconds] pairs (python -m
    # core.plan calibrate): all-reduce, reduce-scatter, all-gather, ring exchange, all-to-all; where given, they price
    # the collectives inside a node instead of intra_node_gbs and the latencies (gloo's mid-sized
    # messages cost far more than a line through a tiny and a large one says). Each either one
    # table over all the node's devices (smaller groups' reductions scaled by the ring's steps) or
    # one per group size ({k: table}, every group of k calling at once: what calibrate writes)
    all_reduce_us: list | dict = field(default_factory=list)
    reduce_scatter_us: list | dict = field(default_factory=list)     # bytes: the whole input
    all_gather_us: list | dict = field(default_factory=list)         # bytes: the whole output
    exchange_us: list | dict = field(default_factory=list)
    all_to_all_us: list | dict = field(default_factory=list)
    # per engine family ("plain": DDP and pipelines, "chunked": ZeRO and offload, "tensor": tensor
    # parallelism without them), what the allocator's high-water mark makes of the memory freed and
    # made again every step (activations, gradients): measured / modelled, on a calibration model
    # (freed blocks it keeps, fragmentation); 1 where absent
    memory_overhead: dict = field(default_factory=dict)
    device_is_host: bool = False           # the devices are the host's CPUs (a CPU-only machine): what a
    #                                        process keeps in host memory counts against its device memory
    host_cores: int = 0                    # where the devices are processes on the host's CPUs: the cores
    #                                        they share (0: each device computes on its own)

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    def flops(self, precision: str) -> float:
        """Dense matrix-product FLOP/s of one device at `precision`."""
        return float(self.tflops[precision]) * 1e12

    def link(self, span: int) -> tuple[float, float]:
        """(bytes/s per rank, seconds per call) of a collective whose group spans `span` consecutive
        ranks: inside a node when it fits in one, else across nodes, where the node's devices
        share its network links."""
        if span <= self.devices_per_node:
            return self.intra_node_gbs * 1e9, self.intra_node_latency_us * 1e-6
        return self.inter_node_gbs * 1e9 / self.devices_per_node, self.inter_node_latency_us * 1e-6

    def collective_s(self, k: int, payload: float, span: int = 0, kind: str = "all_reduce") -> float | None:
        """Seconds for a collective (`kind`: all_reduce, reduce_scatter, all_gather) of `payload`
        bytes over `k` ranks spread over `span` consecutive ranks (default k) of one node, from the
        table measured for groups of k (or the next larger size measured, scaled to k by the ring's
        k - 1 steps; a single table is the node's devices'); None without a table or across nodes."""
        table = getattr(self, f"{kind}_us")
        if not table or max(k, span) > self.devices_per_node:
            return None
        if k <= 1 or payload <= 0:
            return 0.0
        n, table = self._for_group(table, k)
        t = _interpolate(table, payload)
        return t * (k - 1) / (n - 1) if n > 1 else t

    def exchange_s(self, payload: float, span: int, k: int = 0) -> float | None:
        """Seconds for one ring exchange (send `payload` bytes on, receive as many from behind) in
        a ring of `k` ranks (default: all the node's) `span` apart or closer inside a node, from the
        measured table; None without one."""
        return self._by_group("exchange_us", payload, span, k)

    def all_to_all_s(self, payload: float, span: int, k: int = 0) -> float | None:
        """Seconds for an all-to-all of `payload` bytes a rank hands in, among `k` ranks (default:
        all the node's) inside a node, from the measured table; None without one."""
        return self._by_group("all_to_all_us", payload, span, k)

    def _by_group(self, name: str, payload: float, span: int, k: int) -> float | None:
        table = getattr(self, name)
        if not table or span > self.devices_per_node:
            return None
        if payload <= 0:
            return 0.0
        return _interpolate(self._for_group(table, k or self.devices_per_node)[1], payload)

    def _for_group(self, table: list | dict, k: int) -> tuple[int, list]:
        """(the group size it was measured for, the table) that prices a group of k: its own, else
        the next larger measured (else the largest); a single table is the node's devices'."""
        tables = table if isinstance(table, dict) else {self.devices_per_node: table}
        n = min((g for g in tables if g >= k), default=max(tables))
        return n, tables[n]

    def describe(self) -> str:
        return (f"{self.name}: {self.nodes} x {self.devices_per_node} devices of {self.device_memory_gb:g} GiB, "
                f"host {self.host_memory_gb:g} GiB/node, NVMe {self.nvme_gb:g} GiB/node")

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


_POSITIVE = {"nodes", "devices_per_node", "device_memory_gb", "nvme_read_gbs", "nvme_write_gbs", "host_link_gbs",
             "host_adam_gparams", "intra_node_gbs", "inter_node_gbs"}


_TABLES = ("all_reduce_us", "reduce_scatter_us", "all_gather_us", "exchange_us", "all_to_all_us")


def _interpolate(table: list, payload: float) -> float:
    """Seconds for `payload` bytes from a [bytes, microseconds] table: log-log between its sizes,
    its smallest size's time below them, linear in the bytes past the largest."""
    sizes = [float(b) for b, _ in table]
    times = [float(t) * 1e-6 for _, t in table]
    if payload <= sizes[0]:
        return times[0]
    if payload >= sizes[-1]:
        return times[-1] * payload / sizes[-1]
    i = next(j for j in range(1, len(sizes)) if payload <= sizes[j])
    f = math.log(payload / sizes[i - 1]) / math.log(sizes[i] / sizes[i - 1])
    return times[i - 1] * (times[i] / times[i - 1]) ** f


def cluster_from_dict(data: dict, where: str = "cluster") -> Cluster:
    """A Cluster from a mapping, every key and value checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of cluster keys, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(Cluster)]
    values = {}
    for key, value in data.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(names)}")
        if key == "name":
            values[key] = str(value)
            continue
        if key in _TABLES:
            grouped = isinstance(value, dict)
            for k, table in (value.items() if grouped else [(None, value)]):
                if grouped and (isinstance(k, bool) or not isinstance(k, int) or k < 2):
                    raise ConfigError(f"{where}: {key}: group size {k!r}; allowed: whole numbers of at least 2")
                if not isinstance(table, list) or not all(
                        isinstance(pair, list) and len(pair) == 2 and all(
                            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in pair)
                        for pair in table) or [b for b, _ in table] != sorted({b for b, _ in table}):
                    raise ConfigError(f"{where}: {key}: got {value!r}; allowed: [bytes, microseconds] pairs, "
                                      f"positive, in increasing bytes, or a mapping of group sizes to such lists")
            if grouped:
                values[key] = {k: [[float(b), float(t)] for b, t in table] for k, table in sorted(value.items())}
            else:
                values[key] = [[float(b), float(t)] for b, t in value]
            continue
        if key == "memory_overhead":
            if not isinstance(value, dict) or set(value) - set(ENGINE_FAMILIES) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in value.values()):
                raise ConfigError(f"{where}: memory_overhead: got {value!r}; allowed: a mapping of "
                                  f"{', '.join(ENGINE_FAMILIES)} to numbers of at least 1")
            values[key] = {k: float(v) for k, v in value.items()}
            continue
        if key == "runtime_extra_gb":
            if not isinstance(value, dict) or set(value) - {"chunked", "tensor"} or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value.values()):
                raise ConfigError(f"{where}: runtime_extra_gb: got {value!r}; allowed: a mapping of chunked, "
                                  f"tensor to numbers of at least 0")
            values[key] = {k: float(v) for k, v in value.items()}
            continue
        if key == "device_is_host":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key}: got {value!r}; allowed: true or false")
            values[key] = value
            continue
        if key == "tflops":
            if not isinstance(value, dict) or set(value) - set(PRECISIONS) or not all(
                    isinstance(v, (int, float)) and v > 0 for v in value.values()):
                raise ConfigError(f"{where}: tflops: got {value!r}; allowed: a mapping of {', '.join(PRECISIONS)} "
                                  f"to positive numbers")
            values[key] = {**Cluster().tflops, **{k: float(v) for k, v in value.items()}}
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key}: got {value!r}; allowed: a number")
        if value < 0 or (key in _POSITIVE and value <= 0):
            raise ConfigError(f"{where}: {key}: got {value!r}; allowed: a number "
                              f"{'above' if key in _POSITIVE else 'at least'} 0")
        if key in ("nodes", "devices_per_node"):
            if int(value) != value:
                raise ConfigError(f"{where}: {key}: got {value!r}; allowed: a whole number")
            value = int(value)
        values[key] = value
    cluster = Cluster(**values)
    if not 0 < cluster.memory_reserve <= 1:
        raise ConfigError(f"{where}: memory_reserve: got {cluster.memory_reserve}; allowed: a fraction in (0, 1]")
    if cluster.offload_overlap < 1:
        raise ConfigError(f"{where}: offload_overlap: got {cluster.offload_overlap}; allowed: at least 1 "
                          f"(an offloaded step never beats max(compute, transfers))")
    return cluster


def find_cluster(name: str) -> Path:
    """A cluster file: a path, or a name under a recipe folder's clusters/ (with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    folders = [d / "clusters" for d in recipe_dirs()]
    for shipped in folders:
        for candidate in (shipped / name, shipped / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for d in folders for p in d.glob("*.yaml")})
    raise ConfigError(f"--cluster: no file {name!r}; give a path or one of: {', '.join(known) or '(none shipped)'} "
                      f"(python -m core.plan calibrate writes one for this machine)")


def load_cluster(name: str) -> Cluster:
    path = find_cluster(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    return cluster_from_dict(data or {}, str(path))
