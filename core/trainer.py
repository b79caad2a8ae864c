"""The one training loop every app uses.

An app hands the trainer a `TrainTask` (a model, a loss function, datasets) and the recipe;
the trainer does the rest: the plugin and the Booster, the optimizer and the learning-rate
schedule, gradient accumulation, clipping, the progress bar, metrics (JSONL) and the
loss-curve picture, evaluation and checkpoints at their cadence, and exact resume.

Exact resume: the data order depends only on (seed, step) (see `core.data`), and a
checkpoint holds the weights, the optimizer, the schedule, the loss scaler, the app's extra
state and every rank's random-number generators, so a run stopped at step k and resumed
computes the same losses as an unbroken run (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from core.booster import Booster, Plugin, make_plugin
from core.checkpoint import (capture_rng, check_intact, find_checkpoints, latest_intact_checkpoint, prune_checkpoints, restore_rng, step_folder)
from core.config import Recipe, to_yaml
from core.distributed import ParallelMesh
from core.distributed import comm
from core.errors import LoomError
from core.faults import fault_point
from core.layout import plan_batches
from core.memory.usage import allocated_peak, peak_bytes, reset_peak
from core.run_folder import init_folder, refuse_earlier_run, resume_folder
from core.metrics import MetricsLog, plot_loss_curve
from core.optim import build_optimizer, build_scheduler
from core.pipeline.schedule import check as check_schedule


@dataclass
class TrainTask:
    """What an app gives the trainer."""

    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]   # (model, micro-batch) -> mean loss
    train_data: Dataset
    eval_data: Dataset | None = None
    collate_fn: Callable | None = None
    units_per_sample: int = 1            # e.g. tokens per sample, for the throughput figure
    unit: str = "samples"
    num_workers: int = 0
    on_eval: Callable[["Trainer"], dict | None] | None = None   # app's own evaluation (samples, ...)
    on_step: Callable[["Trainer"], None] | None = None           # after every optimizer step (EMA, ...)
    add_files: Callable[[Path], None] | None = None              # extra files in each checkpoint
    extra_state: dict[str, Any] = field(default_factory=dict)    # objects with state_dict()
    # under pipeline parallelism: what the first stage takes from a micro-batch, and the loss of
    # the last stage's output against the micro-batch (mean over its samples)
    pipeline_input: Callable[[Any], Any] | None = None
    pipeline_loss: Callable[[Any, Any], torch.Tensor] | None = None


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _rate(per_s: float) -> str:
    """A throughput as people read it: 12,345 tokens/s, but 0.0099 images/s (not 0)."""
    return f"{per_s:,.0f}" if per_s >= 10 else f"{per_s:.3g}"


class Trainer:
    def __init__(self, cfg: Recipe, mesh: ParallelMesh, task: TrainTask, plugin: Plugin | None = None) -> None:
        self.cfg = cfg
        self.tc = cfg.train
        self.mesh = mesh
        self.task = task
        self.plugin = plugin or make_plugin(cfg, mesh)
        self.booster = Booster(self.plugin)
        self.batch = plan_batches(cfg.train, mesh.size("dp"), mesh.size("pp"), cfg.parallel.microbatches)
        if self.pipelined:
            check_schedule(cfg.parallel.pp_schedule, mesh.size("pp"), self.batch.grad_accum, cfg.parallel.virtual_stages)
        self.out = Path(cfg.output.dir)
        self.ckpt_root = self.out / "checkpoints"
        optimizer = build_optimizer(cfg.optim, task.model)
        scheduler = build_scheduler(cfg.train, optimizer)
        boosted = self.booster.boost(task.model, optimizer, scheduler=scheduler)
        self.model, self.optimizer, self.scheduler = boosted.model, boosted.optimizer, boosted.scheduler
        self.step = 0
        self._pending = None        # a checkpoint being written in the background (BackgroundSave)
        self.step_losses: dict[int, float] = {}   # global (dp-averaged) loss of every step run here
        self.eval_losses: dict[int, float] = {}
        self.metrics: MetricsLog | None = None
        self._bar: tqdm | None = None

    # ---------------------------------------------------------------- output and resume

    def log(self, message: str) -> None:
        if self.mesh.is_main:
            (self._bar.write if self._bar is not None else print)(message, file=sys.stderr)

    def _resume_point(self) -> Path | None:
        resume = self.tc.resume
        existing = find_checkpoints(self.ckpt_root)
        if resume == "":
            refuse_earlier_run(self.out, self.cfg.output.overwrite,
                               f"up to step {existing[-1][0]}" if existing else None)
            return None
        if resume == "latest":
            found = self._on_main(lambda: latest_intact_checkpoint(self.ckpt_root, report=self.log))
            if found is None:
                self.log(f"train.resume=latest: no {'intact ' if existing else ''}checkpoint in "
                         f"{self.ckpt_root} yet; starting fresh")
            elif existing and found != existing[-1][1]:
                self.log(f"train.resume=latest: resuming from {found.name}, the newest intact checkpoint")
            return found
        path = resume_folder(resume, self.ckpt_root)
        self._on_main(lambda: check_intact(path))
        return path

    def _on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run by rank 0 alone (reading a checkpoint's every byte once, not once per rank), its
        result or its LoomError shared with every rank."""
        world = self.mesh.world
        result: Any = None
        if world.rank == 0:
            try:
                result = fn()
            except LoomError as e:
                result = e
        if world.size > 1:
            box = [result]
            torch.distributed.broadcast_object_list(box, src=world.global_rank(0), group=world.group)
            result = box[0]
        if isinstance(result, LoomError):
            raise LoomError(str(result))
        return result

    def _prepare_output(self, resume_from: Path | None) -> None:
        world = self.mesh.world
        if self.mesh.is_main:
            if resume_from is None and self.cfg.output.overwrite:
                shutil.rmtree(self.ckpt_root, ignore_errors=True)
                for name in ("metrics.jsonl", "loss.png"):
                    (self.out / name).unlink(missing_ok=True)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(self.cfg))
        comm.barrier(world)
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.mesh.is_main,
                                  keep_until_step=self.step if resume_from is not None else None)

    def _restore(self, folder: Path) -> None:
        state, rng = self.booster.load(folder, self.model, self.optimizer, self.scheduler)
        self.step = int(state["step"])
        for name, obj in self.task.extra_state.items():
            if name in state.get("extra", {}):
                obj.load_state_dict(state["extra"][name])
        if rng is not None:
            restore_rng(rng)
        else:
            self._seed_training_rng()
            self.log("the checkpoint came from a different number of processes: data order and "
                     "weights continue exactly, random streams (dropout) start afresh")
        self.log(f"resumed from {folder} at step {self.step}")

    def _seed_training_rng(self) -> None:
        # Each data-parallel replica draws its own dropout masks; ranks inside one replica agree.
        seed = self.tc.seed + 7919 * (self.mesh.rank("dp") + 1) + 104729 * self.step
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)

    def finish_save(self) -> None:
        """Wait for the checkpoint being written in the background, if any (every rank)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.finish()

    def save_checkpoint(self) -> Path:
        self.finish_save()          # one background save at a time; its failure stops the run here
        folder = step_folder(self.ckpt_root, self.step)
        state = {"step": self.step, "skipped_steps": self.optimizer.skipped_steps,
                 "extra": {name: obj.state_dict() for name, obj in self.task.extra_state.items()}}

        def add_files(tmp: Path) -> None:
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            if self.task.add_files is not None:
                self.task.add_files(tmp)

        saving = self.booster.save(folder, self.model, self.optimizer, self.scheduler, state=state,
                                   rank_state=capture_rng(), add_files=add_files, meta={"step": self.step},
                                   format=self.tc.checkpoint_format, background=self.tc.checkpoint_async,
                                   after=lambda: prune_checkpoints(self.ckpt_root, self.tc.keep_checkpoints))
        if self.tc.checkpoint_async:
            self._pending = saving      # published by its thread; older ones pruned only after that
        return folder

    # ---------------------------------------------------------------- pipeline

    @property
    def pipelined(self) -> bool:
        return self.booster.pipelined

    def _pipeline_step(self, micro_batches: list, train: bool) -> torch.Tensor:
        if self.task.pipeline_input is None or self.task.pipeline_loss is None:
            raise LoomError("this app does not support pipeline parallelism (parallel.pp > 1): its task "
                            "gives no pipeline_input / pipeline_loss")
        return self.booster.execute_pipeline(micro_batches, self.model, self.task.pipeline_input,
                                             self.task.pipeline_loss, self.optimizer if train else None)

    # ---------------------------------------------------------------- evaluation

    def evaluate(self) -> float | None:
        """Mean loss over `train.eval_batches` global batches of the eval set (the same samples
        whatever the layout), averaged over ranks.

        Runs on a forked RNG, so evaluating never changes what training draws next.
        """
        if self.task.eval_data is None:
            return None
        micro, accum = self.batch.micro_batch, self.batch.grad_accum
        loader = self.booster.prepare_dataloader(
            self.task.eval_data, micro, accum, seed=self.tc.seed, shuffle=False,
            steps=self.tc.eval_batches, collate_fn=self.task.collate_fn)
        devices = [self.mesh.device.index or 0] if self.mesh.device.type == "cuda" else []
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.mesh.device)
        # each eval batch's chunk uses (weights in chunks) predict the next's, apart from the steps'
        with torch.no_grad(), torch.random.fork_rng(devices=devices), self.plugin.between_steps(passes=self.model):
            torch.manual_seed(self.tc.seed + 1)
            if self.pipelined:
                batches = iter(loader)
                for _ in range(self.tc.eval_batches):
                    micro_batches = [_to(next(batches), self.mesh.device) for _ in range(accum)]
                    total += self._pipeline_step(micro_batches, train=False).double() * accum
            else:
                for batch in loader:
                    total += self.task.loss_fn(self.model, _to(batch, self.mesh.device)).double()
        self.model.train()
        mean = comm.all_reduce(total / (self.tc.eval_batches * accum), self.mesh.axis("dp"), op="avg")
        return float(mean)

    # ---------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train to `train.steps`; returns a summary (last loss, eval loss, throughput, paths)."""
        resume_from = self._resume_point()
        comm.barrier(self.mesh.world)  # every rank has decided before rank 0 may delete anything
        if resume_from is not None:
            self._restore(resume_from)
        else:
            if self.tc.init_weights:
                folder = init_folder(self.tc.init_weights)
                self._on_main(lambda: check_intact(folder))
                self.booster.load_weights(self.model, folder)
                self.log(f"weights from {folder}; optimizer, schedule and data order start afresh")
            self._seed_training_rng()
        total = self.tc.steps
        micro, accum = self.batch.micro_batch, self.batch.grad_accum
        # Every refusal of the data (fewer samples than a global batch) comes before anything
        # is written in output.dir.
        loader = self.booster.prepare_dataloader(
            self.task.train_data, micro, accum, seed=self.tc.seed, start_step=self.step,
            collate_fn=self.task.collate_fn, num_workers=self.task.num_workers)
        if self.task.eval_data is not None:
            self.booster.prepare_dataloader(self.task.eval_data, micro, accum, seed=self.tc.seed, shuffle=False,
                                           steps=self.tc.eval_batches, collate_fn=self.task.collate_fn)
        self._prepare_output(resume_from)
        if self.step >= total:
            self.log(f"already at step {self.step} of {total}; nothing to do")
            return self._summary(None, 0.0, 0.0)
        batches = iter(loader)
        units_per_step = self.batch.global_batch * self.task.units_per_sample
        dp = self.mesh.axis("dp")
        self.log(f"training {self.step}->{total} steps with {self.booster.describe()}: global batch "
                 f"{self.batch.global_batch} = micro {micro} x accum {accum} x dp {dp.size}; "
                 f"output in {self.out}")

        self._bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, mininterval=0.5,
                         disable=not (self.mesh.is_main and self.tc.progress), file=sys.stderr)
        window: list[torch.Tensor] = []
        window_time = 0.0
        busy_time = 0.0
        units_done = 0
        grad_norm: torch.Tensor | None = None
        eval_loss: float | None = None
        last_ckpt: Path | None = None
        self.model.train()
        step_peak = 0      # the memory high-water mark of the steps themselves (not evaluation, saves)
        step_allocated: int | None = None      # the same, of bytes allocated (where they are counted)
        try:
            while self.step < total:
                t0 = time.perf_counter()
                reset_peak(self.mesh.device)
                step_loss = torch.zeros((), device=self.mesh.device)
                if self.pipelined:
                    micro_batches = [_to(next(batches), self.mesh.device) for _ in range(accum)]
                    step_loss += self._pipeline_step(micro_batches, train=True).float()
                else:
                    for m in range(accum):
                        batch = _to(next(batches), self.mesh.device)
                        sync = m == accum - 1
                        with (contextlib.nullcontext() if sync else self.booster.no_sync(self.model)):
                            loss = self.task.loss_fn(self.model, batch)
                            self.booster.backward(loss / accum, self.optimizer)
                        step_loss += loss.detach().float() / accum
                lr = self.optimizer.param_groups[0]["lr"]
                if self.tc.grad_clip > 0:
                    grad_norm = self.optimizer.clip_grad_norm(self.tc.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                if self.task.on_step is not None:
                    self.task.on_step(self)
                step_peak = max(step_peak, peak_bytes(self.mesh.device))
                allocated = allocated_peak(self.mesh.device)
                if allocated is not None:
                    step_allocated = max(step_allocated or 0, allocated)
                window.append(step_loss)
                dt = time.perf_counter() - t0
                window_time += dt
                busy_time += dt
                units_done += units_per_step

                last = self.step == total
                if self.step % self.tc.log_every == 0 or last:
                    self._log_window(window, window_time, units_per_step, lr, grad_norm)
                    window, window_time = [], 0.0
                if (self.tc.eval_every and self.step % self.tc.eval_every == 0) or last:
                    eval_loss = self._run_eval()
                if (self.tc.checkpoint_every and self.step % self.tc.checkpoint_every == 0) or last:
                    if window:   # steps not logged yet: a non-finite loss must not reach a checkpoint
                        self._check_finite(comm.all_reduce(torch.stack(window), self.mesh.axis("dp"), op="avg"))
                    last_ckpt = self.save_checkpoint()
                fault_point("train.step")
                self._bar.update(1)
        finally:
            self._bar.close()
            self._bar = None
        self.finish_save()
        if self.mesh.is_main and self.metrics is not None:
            plot_loss_curve(self.metrics.path, self.out / "loss.png",
                            title=f"{Path(self.cfg.output.dir).name}: loss")
        summary = self._summary(last_ckpt, busy_time, units_done)
        summary["step_peak_memory_bytes"] = step_peak
        if step_allocated is not None:
            summary["step_peak_allocated_bytes"] = step_allocated
        self.log(self._summary_text(summary, eval_loss))
        return summary

    def _log_window(self, window: list[torch.Tensor], seconds: float, units_per_step: int,
                    lr: float, grad_norm: torch.Tensor | None) -> None:
        losses = comm.all_reduce(torch.stack(window), self.mesh.axis("dp"), op="avg").tolist()
        first = self.step - len(losses) + 1
        for i, value in enumerate(losses):
            self.step_losses[first + i] = value
        self._check_finite(torch.tensor(losses))
        loss = sum(losses) / len(losses)
        rate = units_per_step * len(losses) / max(seconds, 1e-9)
        row = {"step": self.step, "loss": loss, "lr": lr,
               f"{self.task.unit}_per_s": rate, "time": time.time()}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        if self.optimizer.skipped_steps:
            row["skipped_steps"] = self.optimizer.skipped_steps
        self.metrics.write(row)
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {_rate(rate)} {self.task.unit}/s",
                                      refresh=False)

    def _check_finite(self, losses: torch.Tensor) -> None:
        """Stop the run (before any checkpoint of these steps) if a loss is NaN or infinite."""
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            step = self.step - len(losses) + 1 + int(bad[0])
            raise LoomError(f"the loss became {float(losses[bad[0]])} at step {step}; lower optim.lr, use "
                            f"train.grad_clip, or parallel.precision=bf16 instead of fp16, then resume from "
                            f"the last good checkpoint with train.resume=latest (nothing after it was saved)")

    def _run_eval(self) -> float | None:
        with self.plugin.between_steps():      # not part of the steps' trace of chunk uses
            eval_loss = self.evaluate()
            row: dict[str, Any] = {"step": self.step}
            if eval_loss is not None:
                self.eval_losses[self.step] = eval_loss
                row["eval_loss"] = eval_loss
            if self.task.on_eval is not None:
                row.update(self.task.on_eval(self) or {})
        if len(row) > 1:
            self.metrics.write(row)
            self.log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in row.items()))
        return eval_loss

    def _summary(self, checkpoint: Path | None, seconds: float, units: int) -> dict:
        last = self.step_losses.get(self.step)
        return {"step": self.step, "loss": last,
                "eval_loss": self.eval_losses.get(self.step),
                f"{self.task.unit}_per_s": units / seconds if seconds else None,
                "seconds": seconds, "checkpoint": str(checkpoint) if checkpoint else None,
                "output_dir": str(self.out)}

    def _summary_text(self, s: dict, eval_loss: float | None) -> str:
        rate = s.get(f"{self.task.unit}_per_s")
        parts = [f"done: step {s['step']}"]
        if s["loss"] is not None:
            parts.append(f"train loss {s['loss']:.4f}")
        if eval_loss is not None:
            parts.append(f"eval loss {eval_loss:.4f}")
        if rate:
            parts.append(f"{_rate(rate)} {self.task.unit}/s over {s['seconds']:.1f} s")
        if s.get("step_peak_memory_bytes"):
            where = "device" if self.mesh.device.type == "cuda" else "resident"
            parts.append(f"peak {where} memory in the steps {s['step_peak_memory_bytes'] / 2**30:.2f} GiB")
        lines = [", ".join(parts)]
        report = self.booster.report()
        if report:
            lines.append(report)
        if s["checkpoint"]:
            lines.append(f"checkpoint: {s['checkpoint']}")
        lines.append(f"metrics: {self.out / 'metrics.jsonl'}; loss curve: {self.out / 'loss.png'}")
        return "\n".join(lines)
