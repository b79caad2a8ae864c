"""`parallel.auto=true`: an app plans its own layout before it starts, on every rank alike.

The planner's inputs are the recipe, the app's model profiled on the meta device and a cluster
description: `parallel.cluster` (a file, the same on every rank), or, on one node, this machine as
the launcher describes it: WORLD_SIZE processes, each with a GPU's memory (or, without GPUs, its
share of the host's memory), and the cost model's default rates. Nothing is measured at launch,
so every rank computes the same plan.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

from core.autoparallel import PlanError, best_plan
from core.autoparallel.calibrate import host_memory_gb
from core.autoparallel.cluster import Cluster, load_cluster
from core.autoparallel.target import AppTarget, job_for
from core.config import ConfigError, Recipe, with_values
from core.errors import LoomError


def this_machine(world_size: int) -> Cluster:
    """One node of `world_size` processes, each with a GPU's memory or, without GPUs, its share of
    the host's; the cost model's default rates (nothing measured, so every rank agrees)."""
    host = math.floor(host_memory_gb())
    if torch.cuda.is_available():
        device = math.floor(torch.cuda.get_device_properties(0).total_memory / 2**30)
        name = torch.cuda.get_device_name(0)
    else:
        device, name = host / world_size, "CPU processes"
    return Cluster(name=f"this machine: {world_size} {name}", nodes=1, devices_per_node=world_size,
                   device_memory_gb=device, host_memory_gb=host)


def plan_recipe(cfg: Recipe, target: AppTarget, world_size: int, say: Callable[[str], None]) -> Recipe:
    """`cfg` with the planned layout when it asks for parallel.auto; unchanged otherwise."""
    p = cfg.parallel
    if not p.auto:
        return cfg
    if p.cluster:
        cluster = load_cluster(p.cluster)
    else:
        if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) != world_size:
            raise ConfigError("parallel.auto=true on several nodes needs parallel.cluster (a file every node reads "
                              "alike: python -m core.plan calibrate writes one)")
        cluster = this_machine(world_size)
    if cluster.devices != world_size:
        raise ConfigError(f"parallel.cluster={p.cluster}: it describes {cluster.devices} devices, this run has "
                          f"{world_size} processes")
    try:
        plan = best_plan(job_for(target, cfg, world_size), cluster, top=1)
    except PlanError as err:
        raise LoomError(f"parallel.auto: {err}") from None
    say(plan.line())
    # planned: the run (and the recipe its checkpoints keep) holds the layout, not the request
    overlay = {**plan.overlay, "parallel": {**plan.overlay["parallel"], "auto": False}}
    return with_values(cfg, overlay, "from parallel.auto's plan")
