"""The start every entry point shares: check the layout, join the job, build the mesh and plugin."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from core.booster import Plugin, make_plugin
from core.config import Recipe
from core.distributed import ParallelMesh, Runtime, detect, launch, resolve_layout
from core.run_folder import check_run_folder
from core.tensor import tp_grid
from core.trainer import plan_batches


@dataclass
class Session:
    runtime: Runtime
    mesh: ParallelMesh
    plugin: Plugin
    log: Callable[[str], None]     # prints on rank 0 only


@contextmanager
def session(cfg: Recipe) -> Iterator[Session]:
    """Everything about the run's layout is checked before any process group is joined, so a bad
    layout or batch fails at once on every rank; then the job is joined for the block."""
    p = cfg.parallel
    check_run_folder(cfg.output, cfg.train)
    if p.tp > 1:      # what is wrong with the layout itself is said before how it meets the world
        tp_grid(p.tp_mode, p.tp, p.tp_depth)
    layout = resolve_layout(p.dp, p.pp, p.tp, p.sp, detect().world_size)
    plan_batches(cfg.train, layout.dp)
    with launch(p.device, p.backend, p.timeout_s) as rt:
        mesh = ParallelMesh.build(layout, rt.device)
        plugin = make_plugin(cfg, mesh)
        log = (lambda m: print(m, file=sys.stderr)) if mesh.is_main else (lambda m: None)
        yield Session(rt, mesh, plugin, log)
