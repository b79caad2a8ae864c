"""Is this run's layout possible, and how is each global batch split? One answer for every app.

`check_layout(recipe, world_size)` runs before any process group is joined or any model built,
on every rank alike, and refuses in one line what cannot run, in this order: what is wrong with
the layout itself (a tensor-parallel grid that is not square), how it meets the world size, which
axes the app's model can be spread over, which features rule each other out, and the batch (how
the tensor-parallel mode splits it, how it accumulates). It returns the layout and the batch plan
that the session, the plugin and the trainer then use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from core.config import ConfigError, Recipe, TrainConfig
from core.distributed import Layout, resolve_layout
from core.errors import LoomError
from core.pipeline.schedule import check as check_schedule
from core.tensor import batch_parts, tp_grid

AXES = ("dp", "pp", "tp", "sp")
_AXIS_NAMES = {"dp": "data parallelism (parallel.dp)", "pp": "pipeline parallelism (parallel.pp)",
               "tp": "tensor parallelism (parallel.tp)", "sp": "sequence parallelism (parallel.sp)"}


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    global_batch: int


def plan_batches(cfg: TrainConfig, dp: int, pp: int = 1, microbatches: int = 0) -> BatchPlan:
    """Micro-batch, accumulation and global batch for `dp` data-parallel ranks. Under pipeline
    parallelism (pp > 1) the accumulated micro-batches are the pipeline's: `microbatches` when
    given, else what train.global_batch or train.grad_accum ask for, else pp."""
    if pp > 1 and microbatches:
        total = cfg.micro_batch * microbatches * dp
        if cfg.global_batch and cfg.global_batch != total:
            raise ConfigError(f"train.global_batch: got {cfg.global_batch}, but train.micro_batch x "
                              f"parallel.microbatches x dp = {cfg.micro_batch} x {microbatches} x {dp} = {total}; "
                              f"set one of them")
        return BatchPlan(cfg.micro_batch, microbatches, total)
    if pp > 1 and not cfg.global_batch and cfg.grad_accum == 1:
        return BatchPlan(cfg.micro_batch, pp, cfg.micro_batch * pp * dp)
    if cfg.global_batch:
        per_step = cfg.micro_batch * dp
        if cfg.global_batch % per_step:
            raise ConfigError(f"train.global_batch: got {cfg.global_batch}; allowed: a multiple of "
                              f"train.micro_batch x dp = {cfg.micro_batch} x {dp} = {per_step}")
        return BatchPlan(cfg.micro_batch, cfg.global_batch // per_step, cfg.global_batch)
    return BatchPlan(cfg.micro_batch, cfg.grad_accum, cfg.micro_batch * cfg.grad_accum * dp)


def chunked(cfg: Recipe) -> bool:
    """Parameters live in memory chunks (ZeRO, offload or a device budget): the zero plugin."""
    return bool(cfg.parallel.zero) or offloaded(cfg)


def offloaded(cfg: Recipe) -> bool:
    """Chunks may leave the compute device (host or NVMe offload, or a device budget)."""
    return cfg.parallel.offload != "none" or cfg.memory.device_gb > 0


def check_chunk_rule(rule: str, offload: str, step_in_backward: bool) -> None:
    """Whether the chunked engine can step with the update rule `rule` (optim.name): LAMB and LARS
    need every parameter's norm before any chunk steps. (The zero plugin asks too, for callers that
    build it without a recipe.)"""
    if rule in ("lamb", "lars") and (offload == "nvme" or step_in_backward):
        raise LoomError(f"optim.name={rule} needs every parameter's norm before any step, so it cannot step "
                        f"chunks inside backward (memory.step_in_backward) or stream states from NVMe "
                        f"(parallel.offload=nvme); use adamw there, or parallel.offload=none|cpu")


def check_combination(cfg: Recipe, layout: Layout) -> None:
    """Features that rule each other out (every parallel axis composes with every other and with
    the chunked engine; what is refused here cannot work as asked), in one message."""
    p = cfg.parallel
    if chunked(cfg):
        check_chunk_rule(cfg.optim.name, p.offload, cfg.memory.step_in_backward)
    if cfg.memory.step_in_backward and layout.pp > 1:
        raise LoomError("memory.step_in_backward=true updates each chunk as soon as its gradient is complete, but "
                        "a pipeline step (parallel.pp > 1) adds the gradients of several micro-batches first; "
                        "set memory.step_in_backward=false")
    if layout.pp > 1 and p.pp_partition == "cost" and chunked(cfg) and ((p.zero or 3) == 3 or p.offload != "none"):
        raise LoomError("parallel.pp_partition=cost times every layer of the whole model on each rank, but under "
                        "ZeRO-3 or offload a stage is made on the meta device and never holds the others' "
                        "layers; use parallel.pp_partition=layers or params")
    if cfg.memory.step_in_backward:
        accum = plan_batches(cfg.train, layout.dp).grad_accum
        clash = [what for bad, what in ((cfg.train.grad_clip > 0, f"train.grad_clip={cfg.train.grad_clip:g}"),
                                        (accum > 1, f"train.grad_accum={accum}"),
                                        (p.precision == "fp16", "parallel.precision=fp16")) if bad]
        if clash:
            raise LoomError(f"memory.step_in_backward=true updates each chunk during backward, which rules out "
                            f"{', '.join(clash)}; set train.grad_clip=0, train.grad_accum=1 and bf16 or fp32")
        if not chunked(cfg):
            raise LoomError("memory.step_in_backward=true needs the chunked engine: set parallel.zero or "
                            "parallel.offload")


def check_layout(cfg: Recipe, world_size: int, axes: Sequence[str] = AXES,
                 what: str = "this app") -> tuple[Layout, BatchPlan]:
    """The layout and batch plan of `cfg` on `world_size` processes, or one clear refusal.
    `axes` are those the app's model can be spread over (data parallelism always)."""
    p = cfg.parallel
    if getattr(p, "auto", False):     # an app that plans has replaced the request by its plan before this
        raise LoomError(f"parallel.auto=true: {what} cannot plan its own layout yet (the GPT and diffusion apps "
                        f"can); set parallel.* yourself, or see what the planner would pick with python -m core.plan")
    if p.tp > 1:
        tp_grid(p.tp_mode, p.tp, p.tp_depth)
    layout = resolve_layout(p.dp, p.pp, p.tp, p.sp, world_size)
    split = [f"parallel.{a}={getattr(layout, a)}" for a in AXES if a != "dp" and a not in axes
             and getattr(layout, a) > 1]
    if split:
        allowed = ", ".join(_AXIS_NAMES[a] for a in AXES if a in axes or a == "dp")
        raise LoomError(f"{', '.join(split)}: {what} spreads its model with {allowed}, ZeRO (parallel.zero) and "
                        f"offload (parallel.offload) only; set {' '.join(s.split('=')[0] + '=1' for s in split)}")
    check_combination(cfg, layout)
    if layout.tp > 1:
        parts = batch_parts(p.tp_mode, layout.tp, p.tp_depth)
        if cfg.train.micro_batch % parts:
            raise LoomError(f"train.micro_batch={cfg.train.micro_batch} does not split into the {parts} batch parts "
                            f"of parallel.tp_mode={p.tp_mode} (parallel.tp={layout.tp}); use a multiple of {parts}")
    batch = plan_batches(cfg.train, layout.dp, layout.pp, p.microbatches)
    if layout.pp > 1:
        check_schedule(p.pp_schedule, layout.pp, batch.grad_accum, p.virtual_stages)
    return layout, batch
