"""The auto-parallel planner: the model and the machines in, the layout out.

    profile = app.profile(recipe)                     # per layer, from the model on the meta device
    job = Job(profile, global_batch=512, precision="bf16")
    plan = best_plan(job, load_cluster("a100-1024"))  # or a PlanError naming what would fit
    plan.overlay                                      # the recipe keys it sets, as a nested dict

`cluster` describes the machines, `profile` the model, `estimate` scores one layout (step time,
memory per device, host and disk), `search` finds the fastest layouts that fit, and
`alternatives` says why the other kinds of layout lost. `python -m core.plan` is the command.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from core.autoparallel.cluster import Cluster, load_cluster
from core.autoparallel.estimate import GIB, Estimate, Job, Layout, estimate
from core.autoparallel.profile import LayerProfile, ModelProfile, profile_layers
from core.autoparallel.search import Result, brute_force, search
from core.errors import LoomError

__all__ = ["Cluster", "load_cluster", "Job", "Layout", "Estimate", "estimate", "LayerProfile", "ModelProfile",
           "profile_layers", "search", "brute_force", "Plan", "PlanError", "best_plan", "overlay", "alternatives",
           "what_would_fit"]


class PlanError(LoomError):
    """No layout fits; the message names the smallest cluster changes that would."""


@dataclass(frozen=True)
class Plan:
    job: Job
    cluster: Cluster
    result: Result

    @property
    def best(self) -> Estimate:
        return self.result.ranked[0]

    @property
    def overlay(self) -> dict:
        return overlay(self.best, self.job, self.cluster)

    def line(self) -> str:
        """The plan in one line (what an app prints before it runs it)."""
        n = self.cluster.devices
        return f"auto-parallel plan for {n} device{'s' if n > 1 else ''}: {self.best.line()}"


def best_plan(job: Job, cluster: Cluster, top: int = 5) -> Plan:
    result = search(job, cluster, top)
    if not result.ranked:
        raise PlanError(_no_fit_message(job, cluster, result))
    return Plan(job, cluster, result)


def overlay(est: Estimate, job: Job, cluster: Cluster) -> dict:
    """The recipe keys a layout sets: parallel.*, train.micro_batch / global_batch, memory.device_gb
    (the chunks' device budget where parameters are chunked and offloaded), model.gradient_checkpointing."""
    L = est.layout
    parallel = {"dp": L.dp, "tp": L.tp, "tp_mode": L.tp_mode, "tp_depth": L.tp_depth, "pp": L.pp,
                "pp_schedule": L.pp_schedule, "virtual_stages": L.virtual_stages,
                "microbatches": L.microbatches if L.pp > 1 else 0, "pp_partition": "layers",
                "sp": L.sp, "sp_mode": L.sp_mode, "zero": L.zero, "offload": L.offload}
    out = {"parallel": parallel, "train": {"micro_batch": L.micro_batch, "global_batch": job.global_batch}}
    if job.checkpointing:
        out["model"] = {"gradient_checkpointing": L.checkpointing}
    if L.offload != "none":
        # the chunks' device budget: what the device has left once everything but the chunks is counted
        # (never below the chunks the estimate holds there: the engine refuses a budget smaller than
        # its two largest chunks; rounded up to 0.1 MiB, not down past them)
        chunks = est.memory.get("weights", 0.0) / GIB
        budget = max(cluster.device_memory_gb * cluster.memory_reserve - (est.device_bytes / GIB - chunks), chunks)
        out["memory"] = {"device_gb": math.ceil(max(budget, 0.001) * 10240) / 10240}
    return out


FAMILIES: dict[str, Callable[[Layout], bool]] = {
    "data parallelism alone (no ZeRO, no offload)": lambda L: L.devices == L.dp and not L.zero and L.offload == "none",
    "ZeRO without offload": lambda L: L.zero > 0 and L.offload == "none",
    "tensor parallelism": lambda L: L.tp > 1,
    "pipeline parallelism": lambda L: L.pp > 1,
    "sequence parallelism": lambda L: L.sp > 1,
    "host offload": lambda L: L.offload == "cpu",
    "NVMe offload": lambda L: L.offload == "nvme",
    "no activation checkpointing": lambda L: not L.checkpointing,
}


def alternatives(plan: Plan) -> list[tuple[str, Estimate | None, str]]:
    """For each family of layouts the pick is not in: its best member and why it lost."""
    best = plan.best
    out = []
    for name, member in FAMILIES.items():
        if member(best.layout):
            continue
        found = search(plan.job, plan.cluster, top=1, accept=member)
        if found.ranked:
            rival = found.ranked[0]
            out.append((name, rival, _why_slower(rival, best)))
        elif found.rejected:
            rival = min(found.rejected, key=lambda e: e.device_bytes)
            out.append((name, rival, rival.why))
        else:
            out.append((name, None, "no layout of this kind exists for this model and cluster"))
    return out


def _why_slower(rival: Estimate, best: Estimate) -> str:
    if rival.step_s <= best.step_s:
        return "as fast (the pick uses less device memory)"
    grew = {k: rival.times.get(k, 0.0) - best.times.get(k, 0.0) for k in rival.times}
    cause = max(grew, key=grew.get)
    return (f"{rival.step_s / best.step_s:.2f}x slower: more {cause} "
            f"({rival.times[cause]:.3g} s against {best.times.get(cause, 0.0):.3g} s a step)")


DEVICE_SIZES_GB = (8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 141, 192, 256)


def what_would_fit(job: Job, cluster: Cluster) -> list[str]:
    """The smallest change along each axis of the cluster that makes some layout fit."""
    changes = []
    for nodes in (cluster.nodes * 2 ** k for k in range(1, 11)):
        if nodes * cluster.devices_per_node > 2 ** 14:
            break
        if search(job, replace(cluster, nodes=nodes), top=1).ranked:
            changes.append(f"{nodes} nodes ({nodes * cluster.devices_per_node} devices)")
            break
    for size in DEVICE_SIZES_GB:
        if size > cluster.device_memory_gb and search(job, replace(cluster, device_memory_gb=size), top=1).ranked:
            changes.append(f"devices of {size} GiB")
            break
    found = search(job, replace(cluster, host_memory_gb=2.0 ** 40), top=1).ranked
    if found and found[0].host_bytes / GIB / cluster.memory_reserve > cluster.host_memory_gb:
        changes.append(f"{math.ceil(found[0].host_bytes / GIB / cluster.memory_reserve):,} GiB of host memory per node")
    found = search(job, replace(cluster, nvme_gb=2.0 ** 40), top=1).ranked
    if found and found[0].layout.offload == "nvme":
        changes.append(f"{math.ceil(found[0].nvme_bytes / GIB / cluster.memory_reserve):,} GiB of NVMe per node")
    return changes


def _no_fit_message(job: Job, cluster: Cluster, result: Result) -> str:
    closest = min(result.rejected, key=lambda e: e.device_bytes, default=None)
    head = (f"no layout of this {job.profile.params / 1e9:.3g} B-parameter model fits {cluster.describe()}"
            + (f" (the closest, {closest.layout.describe()}, {closest.why})" if closest else ""))
    changes = what_would_fit(job, cluster)
    if changes:
        return head + "; it would fit with " + ", or ".join(changes)
    return head + "; no change of nodes, device memory, host memory or NVMe tried here makes it fit"
