"""The planner against measured runs on this machine: does its pick run fastest, do its predictions
order the layouts as the runs do, and does it predict their memory?

    python -m benchmarks.planner_accuracy                       # 3 GPT shapes x 2 caps on 4 and 8 ranks
    python -m benchmarks.planner_accuracy --ranks 4 --shapes a --caps loose --runs 8    # a few minutes

Per number of ranks it first calibrates this machine (`core.autoparallel.calibrate`: all ranks
computing at once, gloo collectives by size and group size, disk, host Adam; then, from a trivial one-layer model
run the same way, the memory a training process holds beyond its model and the fixed costs of a
step, of a micro-batch and of the chunked engine; and from a small calibration model of its own
shape, what autograd's graph keeps per layer and micro-batch and the allocator's memory overhead
per engine family); the planner sees only that and the
model's meta-device profile, never the runs it is judged on. Per case (a GPT shape and a per-rank memory
cap for the weights, gradients, optimizer states and activations), it enumerates every layout the
planner considers, keeps those predicted to fit, and runs the planner's pick and `--runs` - 1
others spread evenly over the predicted step times (every feasible layout is thousands here: dp x
tp modes x pp schedules x sp modes x ZeRO x offload x micro-batch x checkpointing). Each run is the
GPT app's own `train` on forked gloo ranks for `--steps` steps (the first two not timed); its step
time is the median of the timed steps.

Its memory is what a GPU's `max_memory_allocated` would say: the largest rank's allocated bytes
at the steps' peak less its own before the model was built, counted by an allocation counter
preloaded into the ranks (`benchmarks/heapcount.c`: malloc's live bytes on every thread). The
resident set (`--memory rss`, and printed beside it) also holds what glibc keeps of freed blocks
and the pages torch's libraries touch as they start, 50-90 MiB a rank here, two to three times
what these small models allocate; calibration measures with the same counter as the cases.

One JSON line per case:
- `planner_pick_ratio`: the pick's measured step time / the fastest measured (target <= 1.10);
- `planner_rank_correlation`: Spearman's rho between predicted and measured step times (>= 0.8);
- `planner_memory_ratio`: predicted / measured memory per rank, median and range (within 15%);
- `planner_pick_out_of_memory`: 1 when the pick's measured memory passed the cap (target 0); the
  planner plans as it does for a user, filling at most `memory_reserve` (0.9) of the cap, and so
  do the other layouts run (those it predicts to fit);
- `resident_memory_ratio`, `pick_resident_over_cap`: the same against the resident set;
- `refused`: planned layouts the app refused to run (each a planner error; none expected).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path

from scipy.stats import spearmanr

from apps.gpt.config import GPTRecipe
from apps.gpt.planning import TARGET
from benchmarks._heap import preload
from benchmarks._machine import machine
from core.autoparallel import GIB, Layout, best_plan, estimate, overlay
from core.autoparallel.calibrate import calibrate
from core.autoparallel.estimate import TRANSIENT
from core.autoparallel.search import all_layouts
from core.autoparallel.target import job_for
from core.config import load_recipe
from core.distributed.testing import run_distributed

SHAPES = {"a": ["model.n_layer=4", "model.d_model=256", "model.n_head=8", "model.seq_len=128"],
          "b": ["model.n_layer=8", "model.d_model=192", "model.n_head=6", "model.seq_len=64"],
          "c": ["model.n_layer=2", "model.d_model=384", "model.n_head=8", "model.seq_len=256"]}
COMMON = ["data.tokenizer=bytes", "data.max_bytes=400000", "data.val_fraction=0", "train.global_batch=16",
          "train.micro_batch=1", "sample.tokens=0", "train.progress=false", "train.log_every=1",
          "train.eval_every=0", "train.checkpoint_every=0", "optim.name=adamw", "model.dropout=0"]


def _flat(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={value}")
    return out


def _rank_run(argv: list[str]) -> tuple[int, int, int, int, list[float]]:
    """One rank: the GPT app's train on this recipe; (resident bytes before the model was built, the
    steps' resident peak, allocated bytes before, the steps' allocated peak, step seconds from rank
    0's metrics). Allocated bytes are counted by the preloaded counter (0 without it)."""
    import contextlib
    import io

    from apps.gpt.pretrain import train
    from core.memory.usage import allocated_bytes, process_bytes
    from core.distributed import detect
    import torch

    cpu = torch.device("cpu")
    before, allocated = process_bytes(cpu), allocated_bytes(cpu) or 0
    cfg = load_recipe(GPTRecipe, "gpt/tiny", argv)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg)
    steps = []
    if detect().rank == 0:
        tokens = cfg.train.global_batch * cfg.model.seq_len
        rows = [json.loads(line) for line in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
        steps = [tokens / r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return before, summary["step_peak_memory_bytes"], allocated, summary.get("step_peak_allocated_bytes", 0), steps


def _measure(argv: list[str], ranks: int, memory: str, steps: int) -> tuple[float, int, int]:
    """Step seconds (the median of the timed steps: all but the first two), the memory per rank by
    `memory` ("allocated" or "rss") and the resident set, each the largest rank's less its own
    before the model was built."""
    got = run_distributed(_rank_run, world_size=ranks, args=(argv + [f"train.steps={steps}"],), timeout=900)
    rss = max(peak - before for before, peak, _, _, _ in got)
    allocated = max(peak - before for _, _, before, peak, _ in got)
    times = got[0][4]
    step = statistics.median(times[2:]) if len(times) > 2 else times[-1]
    return step, allocated if memory == "allocated" else rss, rss


def run_case(name: str, shape: str, cap_gb: float, ranks: int, cluster, runs: int, steps: int, work: Path,
             memory: str) -> dict:
    # the planner as a user runs it: it fills at most `memory_reserve` (0.9) of the cap
    cluster = dataclasses.replace(cluster, device_memory_gb=cap_gb)
    base = SHAPES[shape] + COMMON + [f"data.cache_dir={work / 'cache'}"]
    cfg = load_recipe(GPTRecipe, "gpt/tiny", base)
    job = job_for(TARGET, cfg, ranks)
    pick = best_plan(job, cluster, top=1).best
    fits = sorted((e for e in (estimate(job, lay, cluster) for lay in all_layouts(job, cluster)) if e.fits),
                  key=lambda e: e.step_s)
    chosen = [pick] + [fits[round(i * (len(fits) - 1) / max(runs - 2, 1))] for i in range(runs - 1)]
    seen, plan = set(), []
    for est in chosen:
        if est.layout not in seen:
            seen.add(est.layout)
            plan.append(est)
    results, refused = [], []
    for i, est in enumerate(plan):
        out = work / f"{name}-{i}"
        argv = base + _flat(overlay(est, job, cluster)) + [f"output.dir={out}", "output.overwrite=true"]
        try:
            step, used, rss = _measure(argv, ranks, memory, steps)
        except Exception as err:          # a planned layout the app refuses is a planner error: counted, shown
            why = str(err).strip().splitlines()[-1]
            refused.append(f"{est.layout.describe()}: {why}")
            print(f"  {est.layout.describe()}: REFUSED by the app: {why}", flush=True)
            if i == 0:
                raise
            continue
        results.append((est, step, used, rss))
        print(f"  {est.layout.describe()}: predicted {est.step_s:.3f} s, {est.device_bytes / 2**20:.0f} MiB; "
              f"measured {step:.3f} s, {used / 2**20:.0f} MiB ({rss / 2**20:.0f} MiB resident)", flush=True)
    best = min(r[1] for r in results)
    ratios = [e.device_bytes / m for e, _, m, _ in results if m > 0]
    resident = [e.device_bytes / r for e, _, _, r in results if r > 0]
    return {"case": name, "ranks": ranks, "cap_gib": cap_gb, "feasible": len(fits), "ran": len(results),
            "pick": pick.layout.describe(), "planner_pick_ratio": round(results[0][1] / best, 3),
            "planner_rank_correlation": round(float(spearmanr([r[0].step_s for r in results],
                                                              [r[1] for r in results]).statistic), 3),
            "memory_measured": memory,
            "planner_memory_ratio_median": round(statistics.median(ratios), 3),
            "planner_memory_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "planner_pick_out_of_memory": int(results[0][2] > cap_gb * GIB),
            "resident_memory_ratio_median": round(statistics.median(resident), 3),
            "resident_memory_ratio_range": [round(min(resident), 3), round(max(resident), 3)],
            "pick_resident_over_cap": int(results[0][3] > cap_gb * GIB), "refused": refused}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--shapes", default="a,b,c")
    ap.add_argument("--caps", default="loose,tight", help="loose: 1 GiB a rank; tight: the median feasible need")
    ap.add_argument("--runs", type=int, default=10, help="layouts run per case, the planner's pick first")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--memory", choices=("allocated", "rss"), default="allocated",
                    help="what a rank's memory is: the bytes allocated at the steps' peak (benchmarks/heapcount.c, "
                         "what a GPU's max_memory_allocated reports), or the resident set's high-water mark")
    args = ap.parse_args()
    # torch's flight recorder keeps a record of each of a process's last 2000 collectives (about
    # 0.7 KiB each here, 1.4 MiB when full), growing until it is full: a run of a few steps fills it
    # for a layout that calls many collectives (1D tensor parallelism over 8 ranks: 16 a micro-batch)
    # and not for one that calls few (DDP: one a step), which no model of a long run should
    # follow. The ranks here, calibration's and the cases' alike, run without it (unless the
    # environment says otherwise); the planner leaves it to the memory reserve.
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "0")
    with tempfile.TemporaryDirectory(prefix="loom-planner-") as tmp:
        work = Path(tmp)
        os.environ["LOOM_CACHE"] = str(work / "cache")
        if args.memory == "allocated":
            preload(work)            # before the first ranks start: they inherit it
        for ranks in args.ranks:
            cluster = engine_costs(ranks, calibrate(ranks, 1.0, work), work, args.steps, args.memory)
            for shape in args.shapes.split(","):
                for cap in args.caps.split(","):
                    cap_gb = 1.0 if cap == "loose" else _tight(shape, ranks, cluster)
                    name = f"{shape}-{cap}-{ranks}"
                    print(f"case {name}: cap {cap_gb:.3f} GiB a rank", flush=True)
                    row = run_case(name, shape, cap_gb, ranks, cluster, args.runs, args.steps, work, args.memory)
                    print(json.dumps({"name": "planner_accuracy", **row, "machine": machine()}), flush=True)


TRIVIAL = ["model.n_layer=1", "model.d_model=8", "model.n_head=8", "model.seq_len=64"]
# the model the allocator's overhead is measured on: none of the cases' shapes
CALIBRATION = ["model.n_layer=2", "model.d_model=128", "model.n_head=8", "model.seq_len=128"]


def engine_costs(ranks: int, cluster, work: Path, steps: int, memory: str):
    """Calibration, part two, none of it on the cases' models. From a trivial model (one layer, 8
    wide: its arithmetic is nothing) run the way the cases run: the memory a training process holds
    beyond its model (imports after start, the corpus, gloo, DDP), and what the chunked engine
    (ZeRO-2) and tensor parallelism over every rank add to it; the fixed costs of a step and of a
    micro-batch (4 micro-batches of 1 against 1 of 4) and what the chunked engine adds (ZeRO-2).
    From a small calibration model (2 layers, 128 wide): autograd's bookkeeping per layer and
    micro-batch in flight (forwards kept for backward, in a process of its own), then, once per engine
    family (DDP, ZeRO-2, 1D tensor parallelism over every rank), the allocator's overhead, what
    the measured memory adds to the modelled as a share of the memory freed and made again every
    step."""
    def run(shape: list[str], micro: int, extra: list[str]):
        argv = shape + COMMON + [f"data.cache_dir={work / 'cache'}", f"train.micro_batch={micro}",
                                 f"train.global_batch={4 * ranks}", f"output.dir={work / 'trivial'}",
                                 "output.overwrite=true", *extra]
        step, used, _ = _measure(argv, ranks, memory, steps)
        return used, step

    def job(shape: list[str], micro: int):
        cfg = load_recipe(GPTRecipe, "gpt/tiny", shape + COMMON + [f"train.micro_batch={micro}",
                                                                   f"train.global_batch={4 * ranks}"])
        return job_for(TARGET, cfg, ranks)

    dp = [f"parallel.dp={ranks}"]
    held, one = run(TRIVIAL, 4, dp)
    _, four = run(TRIVIAL, 1, dp)
    held_chunked, chunked = run(TRIVIAL, 4, dp + ["parallel.zero=2"])
    held_tensor, _ = run(TRIVIAL, 4, ["parallel.dp=1", f"parallel.tp={ranks}"])
    per_micro = max(four - one, 0.0) / 3
    bare = dataclasses.replace(cluster, step_overhead_ms=0, microbatch_overhead_ms=0)
    model = estimate(job(TRIVIAL, 4), Layout(dp=ranks, micro_batch=4, microbatches=1), bare)
    costs = {"runtime_gb": round(max(held - model.device_bytes, 0) / GIB, 4),
             "microbatch_overhead_ms": round(per_micro * 1e3, 2),
             "step_overhead_ms": round(max(one - per_micro - model.step_s, 0.0) * 1e3, 2),
             "chunked_overhead_ms": round(max(chunked - one, 0.0) * 1e3, 2)}
    # what the chunked engine (ZeRO-2) and tensor parallelism (over every rank) hold beyond that,
    # whatever the model: the same trivial model under each
    bare = dataclasses.replace(bare, runtime_gb=costs["runtime_gb"])
    extra = {}
    for family, layout, measured in (("chunked", Layout(dp=ranks, micro_batch=4, zero=2), held_chunked),
                                     ("tensor", Layout(tp=ranks, micro_batch=4, microbatches=ranks), held_tensor)):
        extra[family] = round(max(measured - estimate(job(TRIVIAL, 4), layout, bare).device_bytes, 0) / GIB, 4)
    costs["runtime_extra_gb"] = extra
    cluster = dataclasses.replace(cluster, **costs)
    # autograd's bookkeeping per layer and micro-batch in flight (its graph's nodes: a fixed size,
    # which the allocator's overhead, a share of the activations, misses where micro-batches are
    # many and small), counted directly in a process of its own
    cfg = load_recipe(GPTRecipe, "gpt/tiny", CALIBRATION + COMMON + [f"data.cache_dir={work / 'cache'}"])
    costs["graph_kb"] = round(run_distributed(_graph_bytes, world_size=1, args=(cfg.model,))[0] / 1024, 2)
    cluster = dataclasses.replace(cluster, graph_kb=costs["graph_kb"])
    overhead = {}
    for family, layout, extra in (("plain", Layout(dp=ranks, micro_batch=4), dp),
                                  ("chunked", Layout(dp=ranks, micro_batch=4, zero=2), dp + ["parallel.zero=2"]),
                                  ("tensor", Layout(tp=ranks, micro_batch=4, microbatches=ranks),
                                   ["parallel.dp=1", f"parallel.tp={ranks}"])):
        measured, _ = run(CALIBRATION, 4, extra)
        predicted = estimate(job(CALIBRATION, 4), layout, cluster)
        transient = sum(predicted.memory.get(k, 0.0) for k in TRANSIENT)
        overhead[family] = round(max(1.0 + (measured - predicted.device_bytes) / transient, 1.0), 3)
    costs["memory_overhead"] = overhead
    print(f"engine costs, from a trivial and a calibration model: {costs}", flush=True)
    return dataclasses.replace(cluster, memory_overhead=overhead)


def _graph_bytes(model_cfg, micro_batches: int = 8) -> float:
    """Host bytes a GPT's forward keeps per layer and micro-batch beyond the tensors autograd saves
    (its graph's nodes and their records): the allocation counter's growth over several forwards,
    each kept for backward, less the saved tensors (each storage once, the weights excepted)."""
    import torch

    from apps.gpt.model import GPT
    from core.memory.usage import allocated_bytes

    # the byte tokenizer's vocabulary, as the cases' (a recipe leaves it to be resolved from the data)
    cfg = dataclasses.replace(model_cfg, vocab_size=257, dropout=0.0, gradient_checkpointing=False)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    layers = model.pipeline_layers()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    cpu = torch.device("cpu")
    kept, live = [], []
    for _ in range(micro_batches):
        idx = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len + 1))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            x = idx[:, :-1]
            for layer in layers:
                x = layer.fn(x)
            kept.append(model.loss(x, idx[:, 1:]))
        live.append((allocated_bytes(cpu) or 0, sum(saved.values())))
    (first, s0), (last, s1) = live[1], live[-1]
    return max((last - first) - (s1 - s0), 0) / (micro_batches - 2) / len(layers)


def _tight(shape: str, ranks: int, cluster) -> float:
    """A cap that half the layouts fitting in 1 GiB need more than."""
    cfg = load_recipe(GPTRecipe, "gpt/tiny", SHAPES[shape] + COMMON)
    job = job_for(TARGET, cfg, ranks)
    loose = dataclasses.replace(cluster, device_memory_gb=1.0, memory_reserve=1.0)
    need = sorted(e.device_bytes for e in (estimate(job, lay, loose) for lay in all_layouts(job, loose)) if e.fits)
    return round(need[len(need) // 2] / GIB, 4)


if __name__ == "__main__":
    main()
