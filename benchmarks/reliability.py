"""Nothing is lost when a training process dies: kill a tiny GPT run at random moments, resume
each with `train.resume=latest`, and compare with the same run left alone.

Each trial starts a fresh run of `python -m apps.gpt.pretrain` (a 1-layer GPT with dropout, so
that the random-number state matters too) and kills it once with SIGKILL, either through a
named fault point (`core/faults.py`: `LOOM_KILL_AT=point:count`, at one of the five steps of a
checkpoint save or after an optimizer step, at a random count) or after a random delay. Then it
reruns the command with `train.resume=latest` until the run completes. Before each resume it
checks every checkpoint the kill left behind against its manifest; afterwards, which one the
resume loaded. Prints JSON lines:

    {"name": "kill_resume_exact", "value": n / kills, ...}
        the resumed run ends with the unbroken run's losses (metrics.jsonl: every step's loss
        and the evaluations) and final weights (model.safetensors), bit for bit
    {"name": "kill_during_save_intact", "value": n / kills_inside_a_save, ...}
        over the kills that landed inside a checkpoint save: every checkpoint folder left
        behind is intact, and the resume loaded the newest intact one

Usage: python -m benchmarks.reliability [--kills 20] [--seed 0] [--quick]
(--quick: 4 kills of a shorter run.) The fast cases of the same checks are in tests/reliability/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks._machine import machine
from core.checkpoint.convert import unsplit_weights
from core.checkpoint import find_checkpoints
from core.checkpoint.manifest import NAME as MANIFEST
from core.checkpoint.manifest import verify

REPO = Path(__file__).resolve().parents[1]
SAVE_POINTS = ("checkpoint.begin", "checkpoint.parts_written", "checkpoint.manifest_written",
               "checkpoint.synced", "checkpoint.published")
STEP_POINT = "train.step"
TINY = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.seq_len=32", "model.dropout=0.1",
        "data.tokenizer=bytes", "train.micro_batch=2", "train.log_every=1", "train.eval_batches=2",
        "train.progress=false", "sample.tokens=0"]


def write_corpus(folder: Path) -> Path:
    """A few kB of text files: enough windows for any of these runs, tokenized in no time."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(2):
        lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}\n"
                 for i in range(200 * part, 200 * part + 200)]
        (folder / f"part{part}.txt").write_text("".join(lines))
    return folder


@dataclass
class Result:
    returncode: int
    stderr: str
    seconds: float
    started: float = 0.0      # time.time() at the start

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


@dataclass
class App:
    """`python -m apps.gpt.pretrain` on a tiny corpus with a fixed recipe (one process, or
    several under torchrun)."""

    corpus: Path
    cache: Path
    steps: int = 8
    checkpoint_every: int = 2
    eval_every: int = 4
    extra: list[str] = field(default_factory=list)
    nproc: int = 1
    forked: bool = False     # one process forked from the test harness's forkserver (torch imported already)

    def overrides(self, out: Path, *more: str) -> list[str]:
        return [*TINY, f"data.path={self.corpus}", f"data.cache_dir={self.cache}",
                f"train.steps={self.steps}", f"train.checkpoint_every={self.checkpoint_every}",
                f"train.eval_every={self.eval_every}", *self.extra, f"output.dir={out}", *more]

    def command(self, out: Path, *more: str, entry: str = "apps.gpt.pretrain") -> list[str]:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                     str(self.nproc)] if self.nproc > 1 else [sys.executable])
        return [*launcher, "-m", entry, *self.overrides(out, *more)]

    def env(self, kill_at: str | None = None, kill_rank: int | None = None, **more: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("LOOM_KILL_AT", "LOOM_KILL_RANK")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOOM_CACHE=str(self.cache), HF_HUB_OFFLINE="1")
        if kill_at:
            env["LOOM_KILL_AT"] = kill_at
        if kill_rank is not None:
            env["LOOM_KILL_RANK"] = str(kill_rank)
        env.update(more)
        return env

    def run(self, out: Path, *more: str, kill_at: str | None = None, kill_rank: int | None = None,
            kill_after_s: float | None = None, entry: str = "apps.gpt.pretrain", timeout: float = 600,
            env: dict[str, str] | None = None) -> Result:
        """Run to the end, or until the fault point kills it, or SIGKILL it after `kill_after_s`."""
        t0, started = time.perf_counter(), time.time()
        if self.forked and self.nproc == 1:
            from core.distributed.testing import run_module

            done = run_module(entry, self.overrides(out, *more), env or self.env(kill_at, kill_rank),
                              kill_after_s=kill_after_s, timeout=timeout, cwd=REPO)
            return Result(done.returncode, done.stderr, time.perf_counter() - t0, started)
        proc = subprocess.Popen(self.command(out, *more, entry=entry), cwd=REPO, text=True,
                                env=env or self.env(kill_at, kill_rank), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        if kill_after_s is not None:
            try:
                proc.wait(kill_after_s)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
            raise
        return Result(proc.returncode, stderr, time.perf_counter() - t0, started)

    def resume(self, out: Path, tries: int = 3) -> list[Result]:
        """Rerun with train.resume=latest until the run completes (or `tries` runs failed)."""
        results = []
        for _ in range(tries):
            results.append(self.run(out, "train.resume=latest"))
            if results[-1].returncode == 0:
                break
        return results


def losses(out: Path) -> list[tuple]:
    """Every logged (step, loss) and (step, eval_loss) of metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], k, r[k]) for r in rows for k in ("loss", "eval_loss") if k in r]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    found = find_checkpoints(Path(out) / "checkpoints")
    if not found:
        raise AssertionError(f"no checkpoint in {out}")
    return unsplit_weights(found[-1][1])          # (either format)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoints_state(out: Path) -> dict[int, str | None]:
    """Every complete-looking checkpoint (one resume=latest may pick): step -> None when it is
    intact (manifest present and every file matches it), else what is wrong."""
    state = {}
    for step, folder in find_checkpoints(Path(out) / "checkpoints"):
        state[step] = (f"{folder.name} has no {MANIFEST}" if not (folder / MANIFEST).is_file()
                       else verify(folder))
    return state


def in_flight_saves(out: Path) -> list[str]:
    """Folders a save leaves only while it runs (the temporary one, the previous copy)."""
    root = Path(out) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def last_logged_step(out: Path) -> int | None:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return None
    steps = [json.loads(line).get("step") for line in path.read_text().splitlines() if line.strip()]
    return max((s for s in steps if s is not None), default=None)


def resumed_from(stderr: str) -> int | None:
    """The step the run resumed at (None when it started fresh)."""
    m = re.search(r"resumed from \S+ at step (\d+)", stderr)
    return int(m.group(1)) if m else None


@dataclass
class Trial:
    kind: str                 # a fault point, or "timed"
    count: int = 0            # the fault point's pass that kills
    delay_s: float = 0.0      # timed kills
    killed: bool = False
    landed: str = ""          # where: the last step logged and the save in flight, if any
    inside_save: bool = False
    intact: bool = True       # every checkpoint left behind verifies, and the newest intact was loaded
    exact: bool = False
    notes: list[str] = field(default_factory=list)


def run_trial(app: App, out: Path, trial: Trial, reference: tuple[list, dict]) -> Trial:
    if trial.kind == "timed":
        result = app.run(out, kill_after_s=trial.delay_s)
    else:
        result = app.run(out, kill_at=f"{trial.kind}:{trial.count}")
    trial.killed = result.killed
    if not trial.killed:
        trial.notes.append(f"not killed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}")
        return trial
    left = checkpoints_state(out)
    flight = in_flight_saves(out)
    step = last_logged_step(out)
    trial.landed = (f"after step {step}" if step is not None else "before step 1") + (f", saving {flight}" if flight else "")
    trial.inside_save = trial.kind in SAVE_POINTS or (trial.kind == "timed" and bool(flight))
    damaged = {s: why for s, why in left.items() if why}
    if damaged:
        trial.intact = False
        trial.notes.append(f"damaged after the kill: {damaged}")
    runs = app.resume(out)
    if runs[-1].returncode != 0:
        trial.intact = False
        trial.notes.append(f"resume failed ({runs[-1].returncode}): {runs[-1].stderr.strip().splitlines()[-3:]}")
        return trial
    start = resumed_from(runs[0].stderr)
    newest_intact = max((s for s, why in left.items() if not why), default=None)
    if start != newest_intact:
        trial.intact = False
        trial.notes.append(f"resumed from step {start}, newest intact checkpoint was {newest_intact}")
    ref_losses, ref_weights = reference
    trial.exact = losses(out) == ref_losses and same_weights(final_weights(out), ref_weights)
    if not trial.exact:
        trial.notes.append("final losses or weights differ from the unbroken run")
    return trial


def draw_trials(rng: random.Random, kills: int, app: App, window: tuple[float, float]) -> list[Trial]:
    """`window`: seconds from the start of the unbroken run to about its first and last step."""
    saves = app.steps // app.checkpoint_every
    trials = []
    for _ in range(kills):
        u = rng.random()
        if u < 0.5:
            trials.append(Trial(rng.choice(SAVE_POINTS), count=rng.randint(1, saves)))
        elif u < 0.8:
            trials.append(Trial(STEP_POINT, count=rng.randint(1, app.steps)))
        else:   # while it trains, if this run is as fast as the unbroken one
            trials.append(Trial("timed", delay_s=round(rng.uniform(*window), 2)))
    return trials


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="4 kills of a shorter run")
    ap.add_argument("--keep", type=Path, help="keep the run folders here")
    args = ap.parse_args(argv)
    kills = 4 if args.quick and args.kills == 20 else args.kills
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="loom-reliability-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        app = App(write_corpus(work / "corpus"), work / "cache",
                  steps=8 if args.quick else 30, checkpoint_every=2 if args.quick else 5,
                  eval_every=4 if args.quick else 10)
        unbroken = app.run(work / "unbroken")
        if unbroken.returncode != 0:
            print(unbroken.stderr, file=sys.stderr)
            return 1
        reference = (losses(work / "unbroken"), final_weights(work / "unbroken"))
        times = [row["time"] for row in map(json.loads, (work / "unbroken" / "metrics.jsonl").read_text().splitlines())
                 if "time" in row]   # training rows only
        window = (max(0.0, times[0] - unbroken.started - 0.5), times[-1] - unbroken.started + 0.5)
        rng = random.Random(args.seed)
        trials = draw_trials(rng, kills, app, window)
        for i, trial in enumerate(trials):
            for attempt in range(3):   # a timed kill that came after the end: draw an earlier one
                out = work / f"trial_{i:02d}_{attempt}"
                run_trial(app, out, trial, reference)
                if trial.killed or trial.kind != "timed":
                    break
                trial.delay_s = round(trial.delay_s * rng.uniform(0.3, 0.8), 2)
                trial.notes.clear()
            where = f"{trial.kind}:{trial.count}" if trial.kind != "timed" else f"timed:{trial.delay_s}s"
            print(f"kill {i + 1}/{kills} at {where} ({trial.landed or 'no kill'}): killed={trial.killed} inside_save={trial.inside_save} "
                  f"intact={trial.intact} exact={trial.exact} {'; '.join(trial.notes)}", file=sys.stderr)
        killed = [t for t in trials if t.killed]
        in_save = [t for t in killed if t.inside_save]
        seconds = time.perf_counter() - t_start
        info = machine()
        common = {"kills": len(killed), "drawn": kills, "seed": args.seed, "steps": app.steps,
                  "checkpoint_every": app.checkpoint_every, "seconds": round(seconds, 1), "machine": info}
        by_kind: dict[str, list[int]] = {}
        for t in killed:
            by_kind.setdefault(t.kind, [0, 0])
            by_kind[t.kind][0] += t.exact
            by_kind[t.kind][1] += 1
        print(json.dumps({"name": "kill_resume_exact", "value": sum(t.exact for t in killed) / max(len(killed), 1),
                          "unit": "fraction of kills",
                          "baseline": "the same run unbroken: losses and final weights bit for bit",
                          "target": 1.0, "by_kind": {k: f"{a}/{b}" for k, (a, b) in sorted(by_kind.items())},
                          **common}))
        print(json.dumps({"name": "kill_during_save_intact",
                          "value": sum(t.intact for t in in_save) / max(len(in_save), 1),
                          "unit": "fraction of kills inside a checkpoint save",
                          "baseline": None, "target": 1.0, "kills_inside_save": len(in_save),
                          "intact_outside_save": f"{sum(t.intact for t in killed if not t.inside_save)}/"
                                                 f"{len(killed) - len(in_save)}",
                          **common}))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
