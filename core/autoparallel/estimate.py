"""The cost model: one layout of one job on one cluster -> step time and memory per device, host, disk.

Compute comes from the model's profile (FLOPs per token per layer, forward and backward; a
checkpointed layer's forward once more) at the cluster's matrix-product rate, plus fixed costs
(the cluster's, measured): per layer and pass (`layer_overhead_us`: kernel launches and the small
ops), per micro-batch, per optimizer step, and the chunked engine's per step; and the elementwise
work, which streams the kept activations at the device's memory bandwidth. Communication, per
axis, with ring algorithms:

- tensor parallelism: `core.tensor.cost.transformer_layer`, the collectives the modes issue op by op;
- sequence parallelism: ring attention passes each rank's keys and values around the ring
  (p - 1 steps forward; backward passes them again with their gradients), all-to-all attention
  swaps q, k, v and the output forward and their gradients backward;
- data parallelism and ZeRO: the gradients all-reduced once a step (DDP), or reduced for each
  micro-batch as its chunks complete and the new weights all-gathered once (the chunked engine;
  ZeRO-3 gathers the weights again for each micro-batch's forward and backward); overlapped with
  the backward it follows, as DDP's buckets and the chunk manager's prefetch are, except on a
  CPU-only machine, where the collectives take the cores that compute;
- pipeline parallelism: the bubble of the schedule, (p - 1) / (m v) of the ideal step (GPipe and
  1F1B v = 1; Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
  Clusters Using Megatron-LM", section 2.2), and each boundary's activations sent forward and
  their gradients back; where the devices are processes sharing fewer cores (`host_cores`), a
  stage waiting in the bubble gives its cores to the busy ones, and the bubble shrinks to what
  the critical path at a core per process adds beyond the work itself;
- offload: optimizer states (and ZeRO-3's weights) moved over the host link, updated by the
  host's CPUs, read and written on NVMe; an offloaded step is `cluster.offload_overlap` x the
  larger of its compute and its transfers (the overlap the chunk manager reaches, measured by
  `benchmarks/offload_efficiency.py`).

Memory per device: weights, gradients, optimizer states and their engine's buffers as each engine
keeps them (`_memory`: DDP and the pipeline's plain parameters, or the chunked engine's working
copies, home copies, master shards and gradient buffers), divided as tp, pp and ZeRO divide them;
the cluster's fixed runtime memory per process (`runtime_gb`, and `runtime_extra_gb` for the
engines a layout uses); what the allocator keeps beyond the live tensors, as measured for the
engine's family (`memory_overhead`); and the activations of the
micro-batches a stage holds at once (1 without a pipeline, m for GPipe, p for 1F1B, p + (p - 1)/v
for the interleaved schedule), per token from the profile (the loss's log-probabilities with the
head's), with, under the grid tensor-parallel modes (2D, 2.5D, 3D), the gathered weight blocks
each micro-batch's products keep for backward, in a pipeline each stage's sent output (kept until
its gradient returns), and, where the devices are the host's CPUs, autograd's graph (`graph_kb`
per layer and micro-batch). The gradients live beside the micro-batches still in flight once a
backward has made them: all of them where forwards follow backwards (1F1B's steady state,
gradient accumulation), all but one where the forwards come first (GPipe).

Groups are placed as Loom's mesh places them: tp innermost, then sp, then dp, pp outermost
(`core.distributed.mesh`); a group whose ranks span more than one node runs at the node's
network bandwidth shared by its devices.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from core.autoparallel.cluster import Cluster
from core.autoparallel.profile import ModelProfile
from core.memory.store import BOUNCE
from core.sequence.attention import MESSAGE_MIN, ring_head_groups
from core.tensor.cost import feature_parts, grid, transformer_layer

GIB = 2**30
_OPT_STATES = {"adamw": 8, "cpu_adam": 8, "lamb": 8, "sgd": 4, "lars": 4}


@dataclass(frozen=True)
class Job:
    """What is trained: the profiled model, the global batch in samples, the precision and the
    update rule, and the axes the app can spread the model over."""

    profile: ModelProfile
    global_batch: int
    precision: str = "fp32"
    optimizer: str = "adamw"
    axes: tuple[str, ...] = ("dp", "pp", "tp", "sp")
    checkpointing: bool = True        # the model can checkpoint its layers (model.gradient_checkpointing)
    chunk_mb: float = 32.0            # memory.chunk_mb: the unit ZeRO-3 and offload move
    max_zero: int = 3                 # the highest ZeRO stage the app can run over several ranks

    @property
    def seq_len(self) -> int:
        return self.profile.seq_len

    @property
    def working_bytes(self) -> int:
        """Bytes per element of the weights the chunks compute with."""
        return 2 if self.precision in ("bf16", "fp16") else 4

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision in ("bf16", "fp16") else self.profile.act_bytes


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    tp_mode: str = "1d"
    tp_depth: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    microbatches: int = 1          # micro-batches per step on each data-parallel rank (accumulated)
    micro_batch: int = 1
    sp: int = 1
    sp_mode: str = "ring"
    zero: int = 0
    offload: str = "none"
    checkpointing: bool = False

    @property
    def devices(self) -> int:
        return self.dp * self.tp * self.pp * self.sp

    def describe(self) -> str:
        parts = [f"dp{self.dp}"]
        if self.tp > 1:
            parts.append(f"tp{self.tp}({self.tp_mode}{f' d={self.tp_depth}' if self.tp_mode == '2.5d' else ''})")
        if self.pp > 1:
            sched = self.pp_schedule + (f" v={self.virtual_stages}" if self.virtual_stages > 1 else "")
            parts.append(f"pp{self.pp}({sched})")
        if self.sp > 1:
            parts.append(f"sp{self.sp}({self.sp_mode})")
        if self.zero:
            parts.append(f"zero{self.zero}")
        if self.offload != "none":
            parts.append(f"offload={self.offload}")
        parts.append(f"micro_batch {self.micro_batch} x {self.microbatches}")
        if self.checkpointing:
            parts.append("checkpointing")
        return " ".join(parts)


@dataclass
class Estimate:
    layout: Layout
    step_s: float
    tokens_per_s: float
    device_bytes: float
    host_bytes: float                # per node
    nvme_bytes: float                # per node
    times: dict = field(default_factory=dict)     # seconds per step by cause
    memory: dict = field(default_factory=dict)    # device bytes by cause
    unit: str = "tokens"             # what tokens_per_s counts (the profile's unit: tokens, samples)
    fits: bool = True
    why: str = ""                    # what does not fit, when it does not

    def line(self) -> str:
        return (f"{self.layout.describe()}: {self.step_s:.4g} s/step, {self.tokens_per_s:,.0f} {self.unit}/s, "
                f"device {self.device_bytes / GIB:.2f} GiB, host {self.host_bytes / GIB:.1f} GiB/node"
                + (f", NVMe {self.nvme_bytes / GIB:.1f} GiB/node" if self.nvme_bytes else ""))


def stage_layers(profile: ModelProfile, parts: int) -> list[list[int]] | None:
    """Layer indices of `parts` pipeline (virtual) stages as Loom cuts them (equal numbers of
    repeated layers; embeddings with the first, head with the last), or None when they do not
    divide."""
    body = [i for i, layer in enumerate(profile.layers) if layer.body]
    if parts == 1:
        return [list(range(len(profile.layers)))]
    if not body or len(body) % parts:
        return None
    per = len(body) // parts
    stages = [body[k * per:(k + 1) * per] for k in range(parts)]
    stages[0] = list(range(0, stages[0][-1] + 1))
    stages[-1] = list(range(stages[-1][0], len(profile.layers)))
    return stages


@dataclass(frozen=True)
class RankSums:
    """What one pipeline rank's layers (all its virtual stages) add up to."""

    flops: float            # forward FLOPs per token
    backward: float         # backward FLOPs per token
    recomputed: float       # forward FLOPs per token run again under activation checkpointing
    bodies: int             # repeated layers (the tensor- and sequence-parallel traffic is per layer)
    count: int              # all its layers (each pass through one pays the fixed cost of its kernels)
    params: float
    trained: float          # of params, those trained (the frozen have no gradients or optimizer states)
    whole: float            # of params, those 1D tensor parallelism leaves whole (LayerProfile.whole)
    whole_trained: float
    act_split: float        # kept activations per token, split by any tensor parallelism
    act_whole: float        # ... whole under 1D tensor parallelism
    kept_boundary: float    # per token, the repeated layers' inputs (all a checkpointed run keeps of them)
    edge_split: float       # the other layers' kept activations (with their own checkpointing, where they have it)
    edge_whole: float
    top_split: float        # the largest repeated layer's activations (recomputed one at a time)
    top_whole: float
    matrices: float = 0.0       # elements of the weight matrices its layers' backward keeps (LayerProfile.matrices)
    edge_matrices: float = 0.0  # ... of those, the other layers' (not recomputed under checkpointing)
    top_matrices: float = 0.0   # ... the largest repeated layer's
    linear_in: float = 0.0      # per token, the kept inputs of its layers' Linears (LayerProfile.linear_in)
    edge_linear_in: float = 0.0
    top_linear_in: float = 0.0


_SUMS: dict[tuple[int, int, int], tuple[ModelProfile, list[RankSums]]] = {}


def rank_sums(prof: ModelProfile, pp: int, virtual: int) -> list[RankSums] | None:
    """Per pipeline rank, the sums of its layers (cached: the search asks for the same cuts often)."""
    key = (id(prof), pp, virtual)
    hit = _SUMS.get(key)
    if hit is not None and hit[0] is prof:
        return hit[1]
    stages = stage_layers(prof, pp * virtual)
    if stages is None:
        return None
    out = []
    for r in range(pp):
        layers = [prof.layers[i] for v in range(virtual) for i in stages[v * pp + r]]
        body = [x for x in layers if x.body]
        edge = [x for x in layers if not x.body]
        top = max(body, key=lambda x: x.act_split + x.act_whole, default=None)
        # checkpointing recomputes the repeated layers (Loom's), or a layer's own checkpointed segments
        again = sum(x.flops if x.body else x.recomputed for x in layers)
        edge_split = sum(x.act_split if x.act_checkpointed is None else x.act_checkpointed for x in edge)
        edge_whole = sum(x.act_whole for x in edge if x.act_checkpointed is None)
        # a weight tied to an earlier stage's (GPT's head and token embedding) is held by both
        held = 0 if r == 0 else sum(x.shared for x in layers)
        out.append(RankSums(sum(x.flops for x in layers), sum(x.backward_flops for x in layers), again, len(body),
                            len(layers), sum(x.params for x in layers) + held,
                            sum(x.trained_params for x in layers) + held,
                            sum(x.whole for x in layers), sum(x.whole_trained for x in layers),
                            sum(x.act_split for x in layers), sum(x.act_whole for x in layers),
                            sum(x.boundary for x in body), edge_split, edge_whole, top.act_split if top else 0.0,
                            top.act_whole if top else 0.0, sum(x.matrices for x in layers),
                            sum(x.matrices for x in edge), top.matrices if top else 0.0,
                            sum(x.linear_in for x in layers),
                            sum(x.linear_in for x in edge if x.act_checkpointed is None),
                            top.linear_in if top else 0.0))
    if len(_SUMS) > 4096:
        _SUMS.clear()
    _SUMS[key] = (prof, out)
    return out


@functools.lru_cache(maxsize=65536)
def _tp_layer(mode: str, tp: int, batch: int, seq: int, hidden: int, e: int, depth: int):
    return transformer_layer(mode, tp, batch, seq, hidden, e, depth)


def _ring(k: int, payload: float, bandwidth: float, latency: float, factor: float, calls: int = 1) -> float:
    """Seconds for collectives over k ranks moving `factor` x the payload on the wire."""
    if k <= 1 or payload <= 0:
        return 0.0
    return factor * payload / bandwidth + calls * latency


def estimate(job: Job, layout: Layout, cluster: Cluster) -> Estimate:
    prof, L = job.profile, layout
    ranks = rank_sums(prof, L.pp, L.virtual_stages)
    if ranks is None:
        raise ValueError(f"{prof.body_count()} layers do not divide into {L.pp * L.virtual_stages} stages")
    tp_split = 1 if L.tp_mode == "1d" else L.tp          # what divides the whole-width activations
    e = job.act_bytes
    tokens_mb = L.micro_batch * job.seq_len / L.sp       # tokens of one micro-batch on one rank (before tp)
    flops = cluster.flops(job.precision)
    passes = 4 if L.checkpointing else 3                 # forward, backward (2x), the recomputed forward

    # ---- per micro-batch, per pipeline rank
    tp_bw, tp_lat = cluster.link(L.tp)
    sp_bw, _ = cluster.link(L.tp * L.sp)
    pp_bw, pp_lat = cluster.link(L.devices)
    if L.tp > 1:
        q, _ = grid(L.tp_mode, L.tp, L.tp_depth)         # ValueError when tp does not fit the mode
        layer_tp = _tp_layer(L.tp_mode, L.tp, L.micro_batch, round(job.seq_len / L.sp), prof.hidden, e, L.tp_depth)
        # 1D's collectives span the tp ranks; the grid modes' rows, columns (and depth) q of them
        measured = cluster.collective_s(q, layer_tp.payload_bytes / max(layer_tp.calls, 1), span=L.tp)
        if measured is None:
            tp_layer_s = layer_tp.wire_bytes / tp_bw + layer_tp.calls * tp_lat
        else:
            tp_layer_s = layer_tp.calls * measured
        if L.checkpointing:
            tp_layer_s *= 1.5                            # the recomputed forward's collectives again
    else:
        tp_layer_s = 0.0
    width = prof.hidden / L.tp                            # of the keys and values a rank holds
    if L.sp > 1:
        block = tokens_mb * width * e                    # one rank's keys (or values) for one layer
        span = L.tp * L.sp
        forwards = 2 if L.checkpointing else 1
        if L.sp_mode == "ring":
            # the fused ring runs its heads in `ring_head_groups` rings, each with its share of the
            # block: forward p - 1 exchanges of keys and values; backward p - 1 of them with their
            # gradients and one of the gradients alone, in one exchange per hop where the messages
            # are small, one per tensor where they are not; each of a ring's p block steps of each
            # pass costs about a small layer's kernels
            heads = max(1, round(prof.heads * width / prof.hidden))
            groups = ring_head_groups(heads, block / heads)
            part = block / groups
            small = part < MESSAGE_MIN
            kv = cluster.exchange_s(2 * part, span, L.sp)
            back = (cluster.exchange_s(4 * part, span, L.sp), cluster.exchange_s(2 * part, span, L.sp)) if small \
                else (cluster.exchange_s(part, span, L.sp),) * 2
            if kv is None or None in back:
                latency = cluster.p2p_latency_us * 1e-6
                sp_layer_s = groups * (_ring(L.sp, 2 * part, sp_bw, latency, forwards * (L.sp - 1),
                                             calls=forwards * (L.sp - 1))
                                       + _ring(L.sp, 4 * part, sp_bw, latency, L.sp,
                                               calls=L.sp if small else 4 * (L.sp - 1) + 2))
            elif small:
                sp_layer_s = groups * ((L.sp - 1) * (forwards * kv + back[0]) + back[1])
            else:
                sp_layer_s = groups * ((L.sp - 1) * forwards * kv + (4 * (L.sp - 1) + 2) * back[0])
            sp_layer_s += groups * L.sp * passes * cluster.layer_overhead_us * 1e-6
        else:
            # q, k, v and the output swapped forward, their gradients backward
            one = cluster.all_to_all_s(block, span, L.sp)
            if one is None:
                sp_layer_s = _ring(L.sp, block, sp_bw, cluster.all_to_all_latency_us * 1e-6, 8 * (L.sp - 1) / L.sp,
                                   calls=8)
            else:
                sp_layer_s = 4 * (forwards + 1) * one
    else:
        sp_layer_s = 0.0
    boundary = tokens_mb * prof.max_boundary / tp_split * (e / prof.act_bytes)
    p2p_s = 0.0
    if L.pp > 1:
        hop = cluster.exchange_s(boundary, L.devices)
        if hop is None:
            p2p_s = _ring(2, boundary, pp_bw, max(pp_lat, cluster.p2p_latency_us * 1e-6), 2 * L.virtual_stages,
                          calls=2 * L.virtual_stages)
        else:
            p2p_s = 2 * L.virtual_stages * hop        # each boundary's activations forward, their gradients back

    per_rank = []
    for rank in ranks:
        f = (rank.flops + (rank.recomputed if L.checkpointing else 0.0) + rank.backward) * tokens_mb / L.tp
        fixed = rank.count * passes * cluster.layer_overhead_us * 1e-6
        # the elementwise work (norms, activations, softmax, residuals) streams what the layers keep:
        # written forward, read back and its gradient written backward, about once more per pass
        streamed = (rank.act_split / L.tp + rank.act_whole / tp_split) * tokens_mb * (e / prof.act_bytes)
        elementwise = streamed * (passes + 1) / (cluster.memory_gbs * 1e9)
        per_rank.append((f / flops + fixed + elementwise, rank.bodies * tp_layer_s, rank.bodies * sp_layer_s))
    compute_mb = max(c for c, _, _ in per_rank)
    mb_s = max(c + t + s for c, t, s in per_rank) + p2p_s

    m, p, v = L.microbatches, L.pp, L.virtual_stages
    pipe_s = (m + (p - 1) / v) * mb_s if p > 1 else m * mb_s
    cores = cluster.host_cores / cluster.devices_per_node if cluster.device_is_host else 1.0
    if p > 1 and 0 < cores < 1:
        # processes sharing fewer cores: a stage waiting in the bubble leaves its cores to the busy
        # ones, so the step takes the longer of the work at the all-busy speed the calibration
        # measured and the schedule's critical path at the speed of a process with a core to itself
        pipe_s = max(m * mb_s, pipe_s * cores)
    bubble_s = pipe_s - m * mb_s

    # ---- once per step: gradients, ZeRO, offload
    # parameters on the busiest device (tp splits all but those it holds whole or splits by
    # features only), and those trained: gradients, states, their traffic
    parts = feature_parts(L.tp_mode, L.tp, L.tp_depth)
    P = max((rank.params - rank.whole) / L.tp + rank.whole / parts for rank in ranks)
    T = max((rank.trained - rank.whole_trained) / L.tp + rank.whole_trained / parts for rank in ranks)
    largest = max(prof.largest / L.tp, prof.largest_whole / parts)     # ... its largest parameter
    R = L.dp * L.sp                                       # ranks holding the same weights
    dp_bw, dp_lat = cluster.link(L.tp * L.sp * L.dp)
    w = job.working_bytes

    def collective(kind: str, payload: float) -> float:
        t = cluster.collective_s(R, payload, span=R * L.tp, kind=kind)
        if t is None:                                     # the ring formula: an all-reduce sends twice
            t = _ring(R, payload, dp_bw, dp_lat, (2 if kind == "all_reduce" else 1) * (R - 1) / R)
        return t

    if not (L.zero or L.offload != "none"):
        sync_s = collective("all_reduce", 4 * T)          # DDP's buckets (the pipeline's flat buffer) once a step
    else:
        # the chunked engine reduces each micro-batch's gradients as its chunks complete (stage 1
        # all-reduces, 2 and 3 reduce-scatter) and all-gathers the updated weights once a step;
        # stage 3 gathers every chunk for each micro-batch's forward and again for its backward
        stage = L.zero or 3
        sync_s = m * collective("all_reduce" if stage == 1 else "reduce_scatter", 4 * T)
        if stage == 3:
            sync_s += 2 * m * collective("all_gather", w * P)
        else:
            sync_s += collective("all_gather", w * T)
    busiest = max(ranks, key=lambda r: r.flops + r.backward)
    share = busiest.backward / max(busiest.flops + (busiest.recomputed if L.checkpointing else 0.0)
                                   + busiest.backward, 1e-30)
    backward_s = m * compute_mb * share
    # hidden behind the backward it follows (DDP's buckets, the chunks' reductions), except where
    # the devices are the host's cores: there the collectives run on the cores that compute
    hidden = 0.0 if cluster.device_is_host else backward_s
    exposed_sync_s = max(sync_s - hidden, 0.0) + (dp_lat if R > 1 else 0.0)

    states = _OPT_STATES.get(job.optimizer, 8)
    shard = T / R if L.zero else T                        # trained parameters whose states this rank keeps
    offload_s = 0.0
    if L.offload != "none":
        moved = shard * (4 + 4)                           # gradients out, new weights back
        if L.zero == 3:
            moved += 2 * m * P * 4 / R                    # weights fetched for each forward and backward
        offload_s = moved / (cluster.host_link_gbs * 1e9)
        offload_s += shard * cluster.devices_per_node / (cluster.host_adam_gparams * 1e9)
        if L.offload == "nvme":
            disk = shard * (4 + states) * cluster.devices_per_node
            offload_s += disk / (cluster.nvme_read_gbs * 1e9) + disk / (cluster.nvme_write_gbs * 1e9)

    compute_s = m * compute_mb
    fixed_s = (cluster.step_overhead_ms + m * cluster.microbatch_overhead_ms
               + (cluster.chunked_overhead_ms if L.zero or L.offload != "none" else 0.0)) * 1e-3
    step_s = pipe_s + exposed_sync_s + fixed_s
    if L.offload != "none":
        step_s = max(step_s, offload_s) * cluster.offload_overlap
    tokens = job.global_batch * job.seq_len

    # ---- memory: the activations a pipeline rank holds at once (micro-batches in flight), then the rest
    scale = e / prof.act_bytes
    if p == 1:
        inflight = 1.0
    elif L.pp_schedule == "gpipe":
        inflight = float(m)
    elif L.pp_schedule == "1f1b":
        inflight = float(min(m, p))
    else:
        inflight = min(float(m), p + (p - 1) / v)
    # the grid modes multiply by a gathered copy of each weight's blocks (2D, 2.5D: a column of the
    # q x q grid, 1/q of the weight; 3D: 1/q^2), which the product keeps for backward, in the
    # activations' precision, once for every micro-batch whose backward is still to come
    gathered = 0.0 if L.tp == 1 or L.tp_mode == "1d" else 1 / q if L.tp_mode != "3d" else 1 / q ** 2
    # 3D gathers a Linear's input over q ranks too (its tokens), and the product keeps that copy:
    # q times the rank's share, q - 1 of it beyond what the split activations count
    inputs = (q - 1) / L.tp * scale if L.tp > 1 and L.tp_mode == "3d" else 0.0
    # how many micro-batches' kept activations are alive beside the whole gradients: where a
    # micro-batch's forward runs after a backward has made them, all those in flight (from the
    # second micro-batch on without a pipeline; 1F1B's steady state, with more micro-batches than
    # are in flight); where the forwards come first (GPipe, 1F1B with no more micro-batches than
    # stages) the first backward makes them beside the others'; with one micro-batch, none
    if p == 1:
        beside = 1.0 if m > 1 else 0.0
    elif L.pp_schedule != "gpipe" and m > inflight:
        beside = inflight
    else:
        beside = inflight - 1
    acts, with_grads = [], []
    for r, rank in enumerate(ranks):
        # per micro-batch in flight: the kept activations; the output a pipeline stage sends, kept
        # until its gradient comes back (one hidden state per (virtual) stage, the model's last
        # excepted); autograd's own bookkeeping, a fixed size per layer (host memory)
        sends = (v if r < p - 1 else v - 1) if p > 1 else 0
        per_mb = sends * prof.hidden * e * tokens_mb / tp_split
        if cluster.device_is_host:
            per_mb += cluster.graph_kb * 1024 * rank.count
        # once: a checkpointed run's recomputed layer, in backward; at backward's start, on the
        # head's rank, the gradients of the log-softmax and of the logits (a micro-batch's tokens x
        # its share of the vocabulary each), before any layer is recomputed
        once = 2 * tokens_mb * prof.vocab / L.tp * e if r == p - 1 else 0.0
        recomputed = 0.0
        if L.checkpointing:
            kept = rank.kept_boundary / tp_split + rank.edge_split / L.tp + rank.edge_whole / tp_split
            top = rank.top_split / L.tp + rank.top_whole / tp_split
            per_mb += (kept * scale + rank.edge_linear_in * inputs) * tokens_mb + rank.edge_matrices * gathered * e
            recomputed = (top * scale + rank.top_linear_in * inputs) * tokens_mb + rank.top_matrices * gathered * e
            once = max(once, recomputed)
        else:
            split = (rank.act_split / L.tp + rank.act_whole / tp_split) * scale + rank.linear_in * inputs
            per_mb += split * tokens_mb + rank.matrices * gathered * e
        acts.append(per_mb * inflight + once)
        # ... and even with none in flight beside them, a checkpointed backward recomputes its first
        # layer when the later layers' gradients are all made
        with_grads.append(per_mb * beside + once if beside else recomputed)
    # a micro-batch's share of them: what backward has freed when it reduces its first chunk
    memory, host, nvme = _memory(job, L, cluster, P, T, largest, R, max(acts), max(with_grads) / (max(acts) or 1.0),
                                 max(acts) / inflight)
    if L.tp > 1 and L.tp_mode != "1d":
        # a Linear's product on a rank is partial sums, reduce-scattered over q ranks, beside all
        # the kept activations (the widest matrix's, at backward's start); gloo copies what it
        # scatters. 2D, 2.5D (SUMMA fused into one collective per operand): the rank's tokens x
        # every output feature; 3D: its gathered tokens (a q-th) x its output block (a q-th)
        widest = prof.largest / max(prof.hidden, 1)
        if L.tp_mode == "3d":
            partial = tokens_mb / q * widest / q * e
        else:
            partial = tokens_mb / (q * L.tp_depth) * widest * e
        gloo = gloo_reduce_scatter(q, partial) if cluster.device_is_host else 0.0
        memory["tensor-parallel buffers"] = partial + gloo
    family = "chunked" if (L.zero or L.offload != "none") else "tensor" if L.tp > 1 else "plain"
    overhead = cluster.memory_overhead.get(family, 1.0)
    if overhead > 1:
        memory["allocator overhead"] = (overhead - 1) * sum(memory.get(k, 0.0) for k in TRANSIENT)
    device = sum(memory.values())

    times = {"compute": compute_s, "tensor": m * max(t for _, t, _ in per_rank),
             "sequence": m * max(s for _, _, s in per_rank), "pipeline p2p": m * p2p_s, "bubble": bubble_s,
             "gradient sync (exposed)": exposed_sync_s, "offload": offload_s, "fixed costs": fixed_s}
    est = Estimate(layout, step_s, tokens / step_s, device, host, nvme, times, memory, prof.unit)
    return _check_fits(est, cluster)


# what is freed and made again every step (and what the allocator's overhead is a share of)
TRANSIENT = ("activations", "activations and gradients", "gradient buffers", "reduction buffers",
             "tensor-parallel buffers")

# What gloo (the backend on CPU devices) holds beside a collective's own tensors over k processes
# (NCCL works in the tensors it is given), measured with the allocation counter of
# benchmarks/heapcount.c on 2, 4 and 8 processes, 0.9-13.7 MiB: an all-reduce keeps a k-th of the
# tensor as scratch, at most about 2 MiB (1.7-2.0 measured); a reduce-scatter copies its input and
# all-reduces the copy; an all-gather copies its output.
GLOO_SCRATCH_MAX = 2 * 2**20
GLOO_ALL_GATHER = 1.0


def gloo_all_reduce(k: int, nbytes: float) -> float:
    """Bytes gloo holds beside an all-reduce of `nbytes` over k processes."""
    return min(nbytes / k, GLOO_SCRATCH_MAX) if k > 1 else 0.0


def gloo_reduce_scatter(k: int, nbytes: float) -> float:
    """Bytes gloo holds beside a reduce-scatter of an `nbytes` input over k processes."""
    return nbytes + gloo_all_reduce(k, nbytes) if k > 1 else 0.0


# the NVMe store's IO threads (memory.io_threads' default)
NVME_IO_THREADS = 4


def _memory(job: Job, L: Layout, cluster: Cluster, P: float, T: float, largest: float, R: int, act: float,
            beside: float, act_mb: float) -> tuple[dict, float, float]:
    """Device bytes by cause (one process), host and NVMe bytes per node, for `P` parameters on the
    busiest device (`T` of them trained: only those have gradients and optimizer states; `largest`
    elements its largest parameter), `R` ranks holding the same weights, `act` bytes of kept
    activations (`act_mb` of them one micro-batch's), and the share of them alive beside the whole
    gradients (`beside`).

    The plain engines (DDP, the pipeline's own gradient averaging): fp32 weights and gradients,
    a second copy of the gradients for the all-reduce (DDP's buckets, made once; the pipeline's
    flat buffer, made at the end of the step, when the activations are gone), the optimizer's
    moments. Gradients accumulate over the micro-batches: they live beside the activations still
    kept once a backward has made them (`beside`).

    The chunked engine (ZeRO, offload; `core.memory`, `core.zero`): the working copy in chunks
    (whole below stage 3; at stage 3 the chunks in use and prefetched), a home copy of it in host
    memory (its shard at stage 3; none where the fp32 master slot serves as the home copy), this
    rank's shard of the fp32 master weights, the moments and the reduced gradient, and the fp32
    gradient buffers of the chunks backward is filling (the first of them opened while all the
    activations are still alive). The states and the home copy live on the device, the host
    (offload=cpu) or NVMe (offload=nvme, the host then holding the chunks in transit and the IO
    threads' bounce buffers). A chunk's reduction makes its shard beside the chunk's buffer and,
    from the second micro-batch on, adds it to the sum of the earlier ones (read back from its file
    on NVMe); it comes after backward has freed that chunk's share of its micro-batch's activations,
    not all of them (the other micro-batches a pipeline holds keep theirs).

    Where the devices are the host's CPUs (`cluster.device_is_host`), host bytes are the process's
    own memory too: offloading to the host moves nothing out of the budget, the collectives run
    on gloo, which copies what it reduces (`gloo_*`), and a step with its states on NVMe starts by
    evicting the working copies, so what it reads takes the place of the backward's transients."""
    states = _OPT_STATES.get(job.optimizer, 8)
    chunked = bool(L.zero or L.offload != "none")
    extra = cluster.runtime_extra_gb
    runtime = (cluster.runtime_gb + (extra.get("chunked", 0.0) if chunked else 0.0)
               + (extra.get("tensor", 0.0) if L.tp > 1 else 0.0)) * GIB
    host = nvme = 0.0
    gloo = cluster.device_is_host
    if not chunked:
        # the gradients, made anew each step (set to None after it), live beside the activations
        # still kept once a backward has made them (`beside`); DDP's buckets are allocated once,
        # the pipeline's flat buffer at the step's end
        grads = 4 * T + (2 * 4 * largest if T else 0.0)
        live = max(act, act * beside + grads)
        memory = {"weights": 4 * P, "optimizer states": states * T, "activations and gradients": live,
                  "runtime": runtime}
        if R > 1 and T:
            scratch = gloo_all_reduce(R, 4 * T) if gloo else 0.0
            if L.pp > 1:
                memory["activations and gradients"] = max(live, grads + 4 * T + scratch)
            else:
                memory["gradient buckets"] = 4 * T + scratch
        return memory, 0.0, 0.0
    stage = L.zero or 3
    w = job.working_bytes
    unit = max(min(job.chunk_mb * 2**20 / w, P), largest)        # a chunk: memory.chunk_mb, or the model when smaller
    shard = P / R
    alias = w == 4 and (R == 1 or stage == 3)
    working = w * (min(3 * unit, P) if stage == 3 else P)
    home = w * (shard if stage == 3 else P)
    if alias and L.offload != "none":                             # the master slot is the home copy
        home = w * (P - T) / (R if stage == 3 else 1)             # (a frozen chunk has only that slot)
    kept = T / R * (4 + states + 4)                               # master, moments, the reduced gradient
    # a pipeline over ZeRO-1/2 chunks that stay on the device keeps every chunk's gradients in its
    # buffer across the micro-batches and reduces them once a step (`PipelinePlugin`'s deferral)
    deferred = L.pp > 1 and stage in (1, 2) and L.offload == "none"
    memory = {"weights": working, "gradient buffers": 4 * (T if deferred else min(2 * unit, T)), "activations": act,
              "runtime": runtime}
    if T and (R > 1 or L.microbatches > 1):
        # reducing a chunk's gradients (`GradientShards.reduce`), in two steps one after the other:
        # the collective, beside the shard a reduce-scatter makes and what gloo holds while it
        # reduces; then, from the second micro-batch on, the shard's sum with the earlier ones' (a
        # new shard, beside the one read back from its file where the states are on NVMe). A chunk
        # is reduced when backward has filled it, having freed about that share of the micro-batch's
        # activations (the other micro-batches in flight keep theirs): what the reduction holds
        # counts beyond the activations and buffers of backward only where it is larger than that
        # share (a stage in one chunk reduces at its micro-batch's backward's end). Interleaved, a
        # chunk spans a rank's virtual stages and completes with the last of them, while the other
        # micro-batches' forwards have kept the activations near their peak: a v-th is freed.
        reduced = 4 * min(unit, T)
        shard = reduced / R if R > 1 and stage >= 2 else 0.0      # ZeRO-1 takes a view of the all-reduced
        collective = 0.0
        if R > 1:
            held = gloo_reduce_scatter(R, reduced) if stage >= 2 else gloo_all_reduce(R, reduced)
            collective = shard + (held if gloo else 0.0)
        accumulate = shard + reduced / R * (2 if L.offload == "nvme" else 1) if L.microbatches > 1 else 0.0
        chunks = max(1, math.ceil(T / unit))
        if deferred:
            # once a step, by each stage's last backward: the micro-batches add up in the buffers
            # and the others' activations are gone
            memory["reduction buffers"] = max(collective - act + act_mb * (1 - 1 / chunks), 0.0)
        else:
            freed = act_mb / max(chunks, L.virtual_stages)
            memory["reduction buffers"] = max(max(collective, accumulate) - freed, 0.0)
    per_process = 0.0
    if L.offload == "none":
        memory["optimizer states"] = kept
        per_process = home
    elif L.offload == "cpu":
        per_process = kept + home
    else:
        nvme = (kept + home) * cluster.devices_per_node
        # on their way to and from the disk during the step: two chunks' shards of master, moments
        # and gradient (the update reads the next chunk's while it works on one), and on a separate
        # device two chunks' working copies coming back; a model of one chunk has one of each
        transit = (4 + states + 4) * min(2 * unit, T) / R + (0.0 if cluster.device_is_host else w * min(2 * unit, P))
        # each IO thread, and the main thread for its synchronous transfers, keeps an aligned bounce
        # buffer for the transfers from tensors that are not 4 KiB-aligned (chunk payloads, reduced
        # gradient shards): up to BOUNCE bytes, for the run
        moved = max(w * unit / (R if stage == 3 else 1), 4 * unit / R)
        bounce = (NVME_IO_THREADS + 1) * min(BOUNCE, -(-moved // 4096) * 4096)
        if cluster.device_is_host:
            # the device is the host: the step starts by evicting every working copy, so what it
            # reads shares the memory with the backward's transients, not with them
            during_backward = sum(memory.get(k, 0.0) for k in ("weights", "gradient buffers", "activations",
                                                                 "reduction buffers"))
            # ZeRO-1/2 over several ranks then rebuild each updated chunk whole (`update_working`:
            # an all-gather of the new shards, beside the states it read) and write it home
            rebuilt = w * min(unit, P) * (1 + GLOO_ALL_GATHER) if stage < 3 and R > 1 else 0.0
            memory["IO buffers"] = bounce
            memory["host copies"] = max(transit + rebuilt - during_backward, 0.0)
            return memory, host, nvme
        per_process = transit + bounce
    if cluster.device_is_host:
        memory["host copies"] = per_process
    else:
        host = per_process * cluster.devices_per_node
    return memory, host, nvme


def _check_fits(est: Estimate, cluster: Cluster) -> Estimate:
    r = cluster.memory_reserve
    over = []
    if est.device_bytes > cluster.device_memory_gb * GIB * r:
        over.append(f"device {est.device_bytes / GIB:.2f} GiB > {cluster.device_memory_gb * r:.2f}")
    if est.host_bytes > cluster.host_memory_gb * GIB * r:
        over.append(f"host {est.host_bytes / GIB:.1f} GiB/node > {cluster.host_memory_gb * r:.1f}")
    if est.nvme_bytes > cluster.nvme_gb * GIB * r:
        over.append(f"NVMe {est.nvme_bytes / GIB:.1f} GiB/node > {cluster.nvme_gb * r:.1f}")
    if over:
        return replace(est, fits=False, why="does not fit: " + ", ".join(over))
    return est


def tp_modes(tp: int) -> list[tuple[str, int]]:
    """(mode, depth) pairs that can run on `tp` ranks."""
    if tp == 1:
        return [("1d", 1)]
    out = [("1d", 1)]
    q = math.isqrt(tp)
    if q * q == tp:
        out.append(("2d", 1))
    for depth in range(2, tp):
        if tp % depth == 0:
            q = math.isqrt(tp // depth)
            if q > 1 and q * q * depth == tp:
                out.append(("2.5d", depth))
    c = round(tp ** (1 / 3))
    if c > 1 and c ** 3 == tp:
        out.append(("3d", 1))
    return out
