"""Pipeline schedules: for each stage, the order in which it runs the forward (F) and backward
(B) of each micro-batch on each of its virtual stages.

- GPipe (Huang et al. 2019): every forward, then every backward. A stage holds the
  activations of all m micro-batches at once.
- 1F1B (PipeDream-Flush; Narayanan et al. 2021, "Efficient Large-Scale Language Model Training
  on GPU Clusters Using Megatron-LM", SC'21): p - s - 1 warm-up forwards on stage s, then one
  forward and one backward in turn, then the remaining backwards. The same bubble as GPipe,
  (p - 1) / m of the ideal time, but a stage holds at most p micro-batches of activations.
- Interleaved 1F1B (same paper, section 2.2): each rank holds v virtual stages (parts of the model
  s, s + p, ..., s + (v - 1) p of p v); the bubble shrinks by v to (p - 1) / (m v), for v times
  as many point-to-point messages. Needs m to be a multiple of p.

A schedule is plain data (`Action`s), so tests can check it and `simulate` can play it out:
that is how the tests prove each schedule free of deadlock and how the benchmark gets each
schedule's ideal bubble.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import LoomError

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Action:
    kind: str      # "F" or "B"
    micro: int     # micro-batch index
    virtual: int = 0  # which of this rank's virtual stages (the model's stage virtual * p + rank)

    def __repr__(self) -> str:
        return f"{self.kind}{self.micro}" + (f".{self.virtual}" if self.virtual else "")


def check(schedule: str, stages: int, micro: int, virtual: int = 1) -> None:
    """Refuse what a schedule cannot run, with the sizes that would work."""
    if schedule not in SCHEDULES:
        raise LoomError(f"parallel.pp_schedule={schedule} is unknown; choose {', '.join(SCHEDULES)}")
    if schedule != "interleaved" and virtual != 1:
        raise LoomError(f"parallel.virtual_stages={virtual} needs parallel.pp_schedule=interleaved")
    if schedule == "1f1b" and micro < stages:
        raise LoomError(f"parallel.pp_schedule=1f1b needs at least as many micro-batches as stages: "
                        f"parallel.microbatches={micro} < parallel.pp={stages}; use {stages} or more")
    if schedule == "interleaved":
        if virtual < 2:
            raise LoomError("parallel.pp_schedule=interleaved needs parallel.virtual_stages >= 2")
        if micro % stages:
            raise LoomError(f"parallel.pp_schedule=interleaved needs parallel.microbatches to be a multiple of "
                            f"parallel.pp={stages}; got {micro}, use {max(stages, micro // stages * stages)} or "
                            f"{(micro // stages + 1) * stages}")


def gpipe(stages: int, stage: int, micro: int) -> list[Action]:
    return [Action("F", i) for i in range(micro)] + [Action("B", i) for i in range(micro)]


def one_f_one_b(stages: int, stage: int, micro: int) -> list[Action]:
    warmup = min(stages - stage - 1, micro)
    out = [Action("F", i) for i in range(warmup)]
    for i in range(micro - warmup):
        out += [Action("F", warmup + i), Action("B", i)]
    return out + [Action("B", i) for i in range(micro - warmup, micro)]


def interleaved(stages: int, stage: int, micro: int, virtual: int) -> list[Action]:
    p, v = stages, virtual
    total = micro * v

    def at(k: int, backward: bool) -> Action:
        virtual = (k // p) % v
        return Action("B" if backward else "F", (k // (p * v)) * p + k % p, v - 1 - virtual if backward else virtual)

    warmup = total if micro == p else min(total, (p - stage - 1) * 2 + (v - 1) * p)
    out = [at(k, False) for k in range(warmup)]
    for i in range(total - warmup):
        out += [at(warmup + i, False), at(i, True)]
    return out + [at(k, True) for k in range(total - warmup, total)]


def build(schedule: str, stages: int, stage: int, micro: int, virtual: int = 1) -> list[Action]:
    check(schedule, stages, micro, virtual)
    if schedule == "gpipe":
        return gpipe(stages, stage, micro)
    if schedule == "1f1b":
        return one_f_one_b(stages, stage, micro)
    return interleaved(stages, stage, micro, virtual)


def simulate(schedule: str, stages: int, micro: int, virtual: int = 1, forward: float = 1.0,
             backward: float = 2.0) -> dict:
    """Play the schedule out with every stage's forward of one virtual stage taking `forward` and its
    backward `backward` time units, messages instant. Returns the makespan, each stage's busy
    time and its largest number of micro-batches held (forward done, backward not yet), or
    raises RuntimeError if the stages would wait on each other forever."""
    p, v = stages, virtual
    plans = [build(schedule, p, s, micro, v) for s in range(p)]
    done: dict[tuple[str, int, int], float] = {}     # (kind, micro, virtual stage) -> finish time
    clock = [0.0] * p
    cursor = [0] * p
    held = [0] * p
    peak = [0] * p
    last = p * v - 1
    while any(cursor[s] < len(plans[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if cursor[s] == len(plans[s]):
                continue
            a = plans[s][cursor[s]]
            g = a.virtual * p + s
            if a.kind == "F":
                need = ("F", a.micro, g - 1) if g > 0 else None
            else:
                need = ("B", a.micro, g + 1) if g < last else ("F", a.micro, g)
            if need is not None and need not in done:
                continue
            start = max(clock[s], done.get(need, 0.0))
            clock[s] = start + (forward if a.kind == "F" else backward)
            done[(a.kind, a.micro, g)] = clock[s]
            if a.kind == "F":
                held[s] += 1
                peak[s] = max(peak[s], held[s])
            else:
                held[s] -= 1
            cursor[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule} with p={p}, m={micro}, v={v} deadlocks")
    makespan = max(clock)
    busy = micro * v * (forward + backward)
    return {"makespan": makespan, "busy": busy, "bubble": (makespan - busy) / busy, "peak_held": peak}
