"""The planner on paper, at the scales this machine cannot run: its picks against published layouts.

    python -m benchmarks.planner_at_scale

1. GPT-3 175B (recipes/gpt/gpt3-175b.yaml) on 1024 A100-80GB (recipes/clusters/a100-1024.yaml):
   the planner's pick against the layout Megatron-LM published for that run (Narayanan et al.
   2021, arXiv 2104.04473, table 1: tensor 8 x pipeline 8 x data 16, batch 1536, micro-batch 1,
   activation recomputation, no ZeRO; 140 TFLOP/s per GPU measured), both scored by the same cost
   model; Megatron's layout is scored with 1F1B and with the interleaved schedule (v = 2, 3, 4) and
   the best of those is the baseline. `planner_pick_vs_megatron` = the pick's predicted tokens/s
   / the baseline's (>= 1: the search is exact over a space that holds the baseline).
2. The same model and batch on 4096 devices (512 such nodes): the search's time
   (`planner_search_s_4096`, target < 10 s).
3. GPT-2 XL (1.56 B, recipes/gpt/gpt2-xl-nvme.yaml) on one 8 GB GPU with 32 GiB of host memory and
   a 1 TB NVMe (recipes/clusters/gpu-8gb-nvme.yaml): the pick must offload.

Every figure is a prediction of the cost model in `core.autoparallel.estimate`; none is measured
on the hardware named. One JSON line per figure.
"""

from __future__ import annotations

import dataclasses
import json
import time

from apps.gpt.config import GPTRecipe
from apps.gpt.planning import TARGET
from benchmarks._machine import machine
from core.autoparallel import Layout, best_plan, estimate, load_cluster
from core.autoparallel.target import job_for
from core.config import load_recipe


def _emit(name: str, value, unit: str, **more) -> None:
    print(json.dumps({"name": name, "value": value, "unit": unit, **more, "machine": machine()}), flush=True)


def megatron_layouts() -> list[Layout]:
    base = Layout(dp=16, tp=8, pp=8, micro_batch=1, microbatches=1536 // 16, checkpointing=True)
    return [base] + [dataclasses.replace(base, pp_schedule="interleaved", virtual_stages=v) for v in (2, 3, 4)]


def main() -> None:
    cfg = load_recipe(GPTRecipe, "gpt/gpt3-175b")
    cluster = load_cluster("a100-1024")
    t0 = time.perf_counter()
    job = job_for(TARGET, cfg, cluster.devices)
    profile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = best_plan(job, cluster, top=3)
    search_s = time.perf_counter() - t0
    theirs = [estimate(job, layout, cluster) for layout in megatron_layouts()]
    fits = [e for e in theirs if e.fits]
    baseline = max(fits or theirs, key=lambda e: e.tokens_per_s)
    pick = plan.best
    flops_per_token = 6 * job.profile.params         # model FLOPs, as Megatron's throughput figures count them
    _emit("planner_pick_vs_megatron", round(pick.tokens_per_s / baseline.tokens_per_s, 4), "ratio",
          target=">= 1", pick=pick.line(), megatron=baseline.line(), megatron_fits=baseline.fits,
          pick_model_tflops_per_gpu=round(pick.tokens_per_s * flops_per_token / cluster.devices / 1e12, 1),
          megatron_model_tflops_per_gpu=round(baseline.tokens_per_s * flops_per_token / cluster.devices / 1e12, 1),
          profile_s=round(profile_s, 2), search_s=round(search_s, 2),
          note="both predicted by Loom's cost model for 1024 A100-80GB; Megatron measured 140 TFLOP/s per GPU "
               "(arXiv 2104.04473 table 1, counting the recomputed forward)")
    big = dataclasses.replace(cluster, nodes=512)
    t0 = time.perf_counter()
    result = best_plan(job, big, top=1).result          # the same model and global batch: the search alone
    _emit("planner_search_s_4096", round(time.perf_counter() - t0, 2), "s", target="< 10",
          layouts_scored=result.visited, shapes=result.shapes, pick=result.ranked[0].line())
    small_cfg = load_recipe(GPTRecipe, "gpt/gpt2-xl-nvme")
    small = load_cluster("gpu-8gb-nvme")
    one = best_plan(job_for(TARGET, small_cfg, 1), small, top=1).best
    _emit("planner_gpt2_xl_on_8gb_offloads", one.layout.offload, "where states live", target="cpu or nvme",
          pick=one.line())


if __name__ == "__main__":
    main()
