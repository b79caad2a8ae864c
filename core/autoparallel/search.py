"""The search: every layout Loom can run for a job on a cluster, the fastest that fits first.

The discrete space (dp x tp x pp x sp over the devices, tensor-parallel mode and depth, pipeline
schedule and virtual stages, micro-batch size, sequence-parallel attention, ZeRO stage, offload,
activation checkpointing) is enumerated exactly, with branch and bound: each shape (the four
sizes, the mode, the micro-batch size) gets a lower bound on its step time (its pipeline's compute
and communication with the cheapest schedule, no checkpointing, no ZeRO-3 traffic, no offload:
every choice left can only add to it), shapes are visited from the lowest bound up, and the visit
stops when the bound reaches the best step time found. `brute_force` scores every layout; the
tests hold the two to the same answer.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

from core.autoparallel.cluster import Cluster
from core.autoparallel.estimate import Estimate, Job, Layout, estimate, stage_layers, tp_modes

MAX_VIRTUAL = 4          # interleaved schedules with up to this many virtual stages per rank


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _head_parts(mode: str, tp: int, depth: int) -> tuple[int, int]:
    """(parts the heads split into, what the width and vocabulary must divide by)."""
    if mode == "1d":
        return tp, tp
    q = round((tp // depth) ** 0.5) if mode in ("2d", "2.5d") else round(tp ** (1 / 3))
    return q, q if mode != "3d" else q * q


def shapes(job: Job, cluster: Cluster) -> Iterator[Layout]:
    """The layouts' shapes: sizes, tensor-parallel mode and micro-batch size (the rest at defaults)."""
    prof, n = job.profile, cluster.devices
    for tp in divisors(n) if "tp" in job.axes else [1]:
        for mode, depth in tp_modes(tp):
            heads, width = _head_parts(mode, tp, depth)
            if prof.heads % heads or prof.hidden % width or (prof.vocab and prof.vocab % width):
                continue
            batch_parts = {"1d": 1, "2d": heads, "2.5d": heads * depth, "3d": heads * heads}[mode]
            for sp in divisors(n // tp) if "sp" in job.axes else [1]:
                if job.seq_len % sp:
                    continue
                for pp in divisors(n // (tp * sp)) if "pp" in job.axes else [1]:
                    if stage_layers(prof, pp) is None:
                        continue
                    dp = n // (tp * sp * pp)
                    if job.global_batch % dp:
                        continue
                    per_rank = job.global_batch // dp
                    for micro in divisors(per_rank):
                        if micro % batch_parts:
                            continue
                        yield Layout(dp=dp, tp=tp, tp_mode=mode, tp_depth=depth, pp=pp, sp=sp,
                                     micro_batch=micro, microbatches=per_rank // micro)


def _schedules(job: Job, shape: Layout) -> list[tuple[str, int]]:
    p, m = shape.pp, shape.microbatches
    if p == 1:
        return [("1f1b", 1)]
    out = [("gpipe", 1)] + ([("1f1b", 1)] if m >= p else [])
    if m % p == 0:
        out += [("interleaved", v) for v in range(2, MAX_VIRTUAL + 1) if stage_layers(job.profile, p * v) is not None]
    return out


def _sp_modes(job: Job, shape: Layout) -> list[str]:
    heads, _ = _head_parts(shape.tp_mode, shape.tp, shape.tp_depth)
    if shape.sp > 1 and (job.profile.heads // heads) % shape.sp == 0:
        return ["ring", "all_to_all"]
    return ["ring"]


def variants(job: Job, cluster: Cluster, shape: Layout) -> Iterator[Layout]:
    """Every layout of one shape: schedule, sequence-parallel attention, ZeRO, offload, checkpointing."""
    replicas = shape.dp * shape.sp
    zeros = list(range(job.max_zero + 1)) if replicas > 1 else [0]
    offloads = ["none", "cpu"] + (["nvme"] if cluster.nvme_gb > 0 else [])
    ckpts = [False, True] if job.checkpointing else [False]
    for (sched, v), sp_mode, zero, offload, ckpt in itertools.product(
            _schedules(job, shape), _sp_modes(job, shape), zeros, offloads, ckpts):
        if offload != "none" and zero == 0:
            # Loom runs offload without a stage as ZeRO-3 (`core.booster.make_plugin`): scored as
            # that, once (over several replicas zero=3 is in the list already)
            if replicas > 1:
                continue
            zero = 3
        yield replace(shape, pp_schedule=sched, virtual_stages=v, sp_mode=sp_mode, zero=zero, offload=offload,
                      checkpointing=ckpt)


def _bound(job: Job, cluster: Cluster, shape: Layout) -> float:
    """A step time no layout of this shape beats: its cheapest schedule and attention, nothing that
    only adds time (checkpointing, ZeRO-3's gathers, offload, exposed gradient sync)."""
    best = float("inf")
    for (sched, v), sp_mode in itertools.product(_schedules(job, shape), _sp_modes(job, shape)):
        est = estimate(job, replace(shape, pp_schedule=sched, virtual_stages=v, sp_mode=sp_mode), cluster)
        best = min(best, est.step_s - est.times["gradient sync (exposed)"])
    return best


def _better(a: Estimate, b: Estimate | None) -> bool:
    return b is None or (a.step_s, a.device_bytes) < (b.step_s, b.device_bytes)


@dataclass
class Result:
    ranked: list[Estimate]           # the fastest layouts that fit, best first (at most `top`)
    rejected: list[Estimate]         # per shape with no layout that fits, the one that needs the least device memory
    visited: int                     # layouts scored
    shapes: int                      # shapes considered


def search(job: Job, cluster: Cluster, top: int = 5, accept: Callable[[Layout], bool] | None = None) -> Result:
    """The `top` fastest layouts that fit (of those `accept` takes), found by branch and bound."""
    all_shapes = list(shapes(job, cluster))
    queue = [(_bound(job, cluster, s), i, s) for i, s in enumerate(all_shapes)]
    heapq.heapify(queue)
    ranked: list[Estimate] = []
    rejected: list[Estimate] = []
    visited = len(queue)
    while queue:
        bound, _, shape = heapq.heappop(queue)
        if len(ranked) >= top and bound > ranked[-1].step_s:
            break
        best_here, closest = None, None
        for layout in variants(job, cluster, shape):
            if accept is not None and not accept(layout):
                continue
            est = estimate(job, layout, cluster)
            visited += 1
            if est.fits:
                if _better(est, best_here):
                    best_here = est
                ranked = _insert(ranked, est, top)
            elif closest is None or est.device_bytes < closest.device_bytes:
                closest = est
        if best_here is None and closest is not None:
            rejected.append(closest)
    rejected.sort(key=lambda e: e.step_s)
    return Result(ranked, rejected, visited, len(all_shapes))


def _insert(ranked: list[Estimate], est: Estimate, top: int) -> list[Estimate]:
    ranked.append(est)
    ranked.sort(key=lambda e: (e.step_s, e.device_bytes))
    return ranked[:top]


def brute_force(job: Job, cluster: Cluster) -> list[Estimate]:
    """Every layout scored; those that fit, fastest first (the reference the search is tested against)."""
    out = [estimate(job, layout, cluster) for shape in shapes(job, cluster) for layout in variants(job, cluster, shape)]
    return sorted((e for e in out if e.fits), key=lambda e: (e.step_s, e.device_bytes))


def all_layouts(job: Job, cluster: Cluster) -> Iterable[Layout]:
    for shape in shapes(job, cluster):
        yield from variants(job, cluster, shape)
