"""How far sequence parallelism stretches the sequence one rank can hold.

    python -m benchmarks.sequence_scaling            # cap 512 MiB per rank, sp = 1, 2, 4
    python -m benchmarks.sequence_scaling --quick    # cap 128 MiB
    python -m benchmarks.sequence_scaling --quick --parts gpt     # the whole tiny GPT only

Each configuration runs causal ring self-attention (`core.sequence.ring_attention`) forward and
backward on gloo ranks of this machine, (batch 1, 8 heads, head size 64, fp32), in two ways:

- `blockwise`: each block a matmul of scores (the reference path, `fused=False`), against its
  baseline at sp = 1, the same algorithm with one L x L block: the full score matrix, as in the
  paper's comparison (Li et al. 2021, arXiv 2105.13120);
- `fused` (Loom's default): each block on PyTorch's fused CPU flash attention, merged by the
  log-sum-exp, against what a user has on one process without Loom: torch's fused
  `scaled_dot_product_attention`, which never holds the score matrix either.

Prints `sequence_length_ratio_sp4` (blockwise, target 3.5) and, for the fused ring,
`sequence_length_ratio_sp4_vs_fused` (sp = 4's longest over torch's fused attention's on one
process, target 3.5) and `sequence_peak_ratio_sp4_vs_fused` (sp = 4's per-rank peak at the fixed
length over torch's one-process peak, target 1.15 / 4), and `sequence_time_ratio_sp1_fused` (the
fused ring's one L x L block over torch's fused attention, forward and backward, median of
alternating runs; target 1.1).

Memory is each rank's peak of bytes held in CPU tensors while the layer's forward and backward
run, above what was held when they started (the activation part, not the inputs or the
interpreter): the running total the CPU allocator reports to torch's profiler at every
allocation and free, so exact. Beside it, at the fixed length, `peak_rss_mib`: the resident-set
high-water mark (Linux VmHWM, reset through /proc/self/clear_refs) above the resident size before
the run, with glibc returning freed buffers of 1 MiB or more to the OS. That one also counts the
runtime's own memory (a few MiB per process, which sp does not divide) and moves with the heap's
state: repeating one sp = 4 GPT step read 10.1, 6.5 and 4.3 MiB (less than the 10.5 MiB its
tensors hold at once: freed heap blocks were reused without new pages), so the ratios are taken on
the tensors' peak.

Prints, per sp, the peak at a fixed length (target: at most 1.15 / sp of sp = 1) and the
longest L whose peak stays under the cap (target: sp = 4 at least 3.5 x sp = 1), as JSON lines.

The whole tiny GPT (`--parts gpt`; `GPT_SHAPE`, forward, loss and backward of one sequence) is
measured the same way at sp = 1 (torch's fused attention: what a user has without Loom), 2 and 4
(Loom's fused ring): `gpt_sequence_length_ratio_sp4_vs_fused` (target 3.5) and
`gpt_sequence_peak_ratio_sp4_vs_fused` (target 1.15 / 4; also at 4x the fixed length, where the
activations sp divides outweigh the parameters' gradients, which every rank holds whole).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys

import torch
import torch.nn.functional as F

from benchmarks._machine import machine

HEADS, DIM, BATCH = 8, 64, 1


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_of(run) -> int:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                     # reset VmHWM to the current RSS
    base = _status("VmRSS")
    run()
    return _status("VmHWM") - base


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tensor_peak_of(run) -> int:
    """The most bytes `run` holds in CPU tensors at once beyond what was held when it started: the
    running total the CPU allocator reports to the profiler at each allocation and free, exact
    (every allocation, between and inside operators), and blind to how glibc keeps the pages."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():              # the profiler's start and stop each print a line there
        prof.start()
    try:
        run()
    finally:
        with _quiet_stderr():
            prof.stop()
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
    if not events:
        return 0
    # the running total counts from the process's first profiled allocation, not from this run's:
    # the total before this run's first event is its base
    _, total, size = min(events)
    return max(0, max(total for _, total, _ in events) - (total - size))


MEASURES = {"tensors": _tensor_peak_of, "rss": _peak_of}


def _worst_rank(run, axis, measure: str | None = None) -> int:
    """The peak of `run` by `MEASURES[measure]` (default: tensors) on every rank of `axis`: the largest."""
    from core.distributed.comm import all_reduce_

    worst = torch.tensor(float(MEASURES[measure or "tensors"](run)))
    if axis.size > 1:
        all_reduce_(worst, axis, "max")
    return int(worst)


def _longest(peak, cap: int, granularity: int) -> int:
    """The longest length, a multiple of `granularity`, whose `peak(length)` stays under `cap`:
    double, then bisect."""
    ok, length = 0, granularity
    while peak(length) <= cap:
        ok, length = length, length * 2
    bad = length
    while bad - ok > granularity:
        mid = (ok + bad) // 2 // granularity * granularity
        if peak(mid) <= cap:
            ok = mid
        else:
            bad = mid
    return ok


def measure(p: int, fixed: int, cap: int, granularity: int, way: str = "blockwise") -> dict:
    """On each of p ranks: the peak at `fixed` tokens and the longest sequence under `cap` bytes,
    of the ring `way` ("blockwise" or "fused"), or, with way="torch" on one rank, of torch's fused
    attention."""
    from core.distributed import Layout, ParallelMesh
    from core.memory.store import return_freed_buffers_to_the_os
    from core.sequence import ring_attention

    return_freed_buffers_to_the_os()
    mesh = ParallelMesh.build(Layout(sp=p))
    axis = mesh.axis("sp")
    torch.manual_seed(axis.rank)

    def peak(length: int, fused: bool = False, measure: str | None = None) -> int:
        q, k, v, g = (torch.randn(BATCH, HEADS, length // p, DIM) for _ in range(4))
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))

        def run():
            y = (F.scaled_dot_product_attention(q, k, v, is_causal=True) if fused or way == "torch"
                 else ring_attention(q, k, v, axis, True, blockwise_on_one_rank=True, fused=way == "fused"))
            y.backward(g)

        return _worst_rank(run, axis, measure)

    peak(granularity)                                    # warm-up: kernels, buffers, groups
    out = {"fixed_peak": peak(fixed), "fixed_peak_rss": peak(fixed, measure="rss")}
    if p == 1 and way == "blockwise":
        out["fixed_peak_fused"] = peak(fixed, fused=True)
    out["longest"] = _longest(peak, cap, granularity)
    return out


GPT_SHAPE = {"n_layer": 2, "n_head": 4, "d_model": 256, "vocab_size": 256, "bias": False}


def measure_gpt(p: int, fixed: int, cap: int, granularity: int) -> dict:
    """As `measure`, for the whole tiny GPT (`GPT_SHAPE`, 4 heads of 64; learned positions as long as
    the sequence) forward, loss and backward on one sequence: at sp = 1 its attention is torch's
    fused `scaled_dot_product_attention`, at sp = p > 1 Loom's ring (fused blocks). Counted: what the
    step allocates, the parameters' gradients included (every rank holds all of them)."""
    from apps.gpt.config import GPTModelConfig
    from apps.gpt.model import GPT
    from core.distributed import Layout, ParallelMesh
    from core.memory.store import return_freed_buffers_to_the_os
    from core.sequence import SequenceParallel

    return_freed_buffers_to_the_os()
    mesh = ParallelMesh.build(Layout(sp=p))
    axis = mesh.axis("sp")

    def peak(length: int, measure: str | None = None) -> int:
        torch.manual_seed(0)
        model = GPT(GPTModelConfig(seq_len=length, **GPT_SHAPE), None,
                    SequenceParallel(axis, "ring") if p > 1 else None)
        tokens = torch.randint(0, GPT_SHAPE["vocab_size"], (BATCH, length + 1))

        def run():
            model.loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()

        return _worst_rank(run, axis, measure)

    peak(granularity)
    out = {"fixed_peak": peak(fixed), "fixed_peak_rss": peak(fixed, measure="rss"), "long_peak": peak(4 * fixed)}
    out["longest"] = _longest(peak, cap, granularity)
    return out


def timing(length: int, repeats: int) -> dict:
    """Seconds for forward and backward at `length` on one rank: torch's fused attention and the
    fused ring's one block, alternating, `repeats` times each (medians)."""
    import statistics
    import time

    from core.distributed.comm import AxisGroup
    from core.sequence import ring_attention

    axis = AxisGroup("sp", 1, 0, (0,))
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(BATCH, HEADS, length, DIM) for _ in range(4))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    ways = {"torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "ring": lambda: ring_attention(q, k, v, axis, True, blockwise_on_one_rank=True, fused=True)}
    times = {name: [] for name in ways}
    for i in range(repeats + 1):
        for name, fn in ways.items():
            t = time.perf_counter()
            fn().backward(g)
            if i:                                        # the first round warms up
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sequence_scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 128 MiB cap and a shorter fixed length")
    ap.add_argument("--cap-mib", type=int, default=0, help="per-rank memory cap for the longest-sequence search")
    ap.add_argument("--parts", default="attention,gpt", help="what to measure: the attention layer, the whole tiny GPT")
    args = ap.parse_args(argv)
    cap = (args.cap_mib or (128 if args.quick else 512)) << 20
    fixed = 1024 if args.quick else 2048
    print(json.dumps({"name": "machine", **machine()}), flush=True)
    parts = args.parts.split(",")
    if "attention" in parts:
        attention(cap, fixed, args.quick)
    if "gpt" in parts:
        whole_gpt(cap, fixed)
    return 0


def whole_gpt(cap: int, fixed: int) -> None:
    """The whole tiny GPT: one process with torch's fused attention against Loom's fused ring."""
    from core.distributed.testing import run_distributed

    got = {p: run_distributed(measure_gpt, world_size=p, args=(p, fixed, cap, 64 * p), timeout=3600)[0]
           for p in (1, 2, 4)}
    for p, r in got.items():
        print(json.dumps({"name": "sequence_scaling_gpt", "sp": p, "model": GPT_SHAPE, "fixed_length": fixed,
                          "peak_mib": round(r["fixed_peak"] / 2 ** 20, 1),
                          "peak_rss_mib": round(r["fixed_peak_rss"] / 2 ** 20, 1),
                          "peak_vs_one_process": round(r["fixed_peak"] / got[1]["fixed_peak"], 3),
                          "cap_mib": cap >> 20, "longest_length": r["longest"],
                          "longest_vs_one_process": round(r["longest"] / got[1]["longest"], 2)}), flush=True)
    print(json.dumps({"name": "gpt_sequence_length_ratio_sp4_vs_fused",
                      "value": round(got[4]["longest"] / got[1]["longest"], 2), "target": 3.5}), flush=True)
    print(json.dumps({"name": "gpt_sequence_peak_ratio_sp4_vs_fused",
                      "value": round(got[4]["fixed_peak"] / got[1]["fixed_peak"], 3),
                      "target": round(1.15 / 4, 4)}), flush=True)
    # at 4x the length, where the activations that sp divides outweigh the parameters' gradients it does not
    print(json.dumps({"name": "gpt_sequence_peak_ratio_sp4_vs_fused_at_4x", "length": 4 * fixed,
                      "value": round(got[4]["long_peak"] / got[1]["long_peak"], 3),
                      "sp4_mib": round(got[4]["long_peak"] / 2 ** 20, 1),
                      "one_process_mib": round(got[1]["long_peak"] / 2 ** 20, 1)}), flush=True)


def attention(cap: int, fixed: int, quick: bool) -> None:
    """The attention layer: the blockwise ring against the full score matrix, the fused ring against
    torch's fused attention on one process, and the one-block time."""
    from core.distributed.testing import run_distributed

    results = {}
    for p in (1, 2, 4):
        results[p] = run_distributed(measure, world_size=p, args=(p, fixed, cap, 64 * p), timeout=1800)[0]
    base = results[1]
    for p, r in results.items():
        line = {"name": "sequence_scaling", "sp": p, "fixed_length": fixed,
                "peak_mib": round(r["fixed_peak"] / 2 ** 20, 1),
                "peak_rss_mib": round(r["fixed_peak_rss"] / 2 ** 20, 1),
                "peak_vs_sp1_times_sp": round(r["fixed_peak"] / base["fixed_peak"] * p, 3),
                "cap_mib": cap >> 20, "longest_length": r["longest"],
                "longest_vs_sp1": round(r["longest"] / base["longest"], 2)}
        if p == 1:
            line["fused_attention_peak_mib"] = round(r["fixed_peak_fused"] / 2 ** 20, 1)
        print(json.dumps(line), flush=True)
    print(json.dumps({"name": "sequence_length_ratio_sp4", "value": round(results[4]["longest"] / base["longest"], 2),
                      "target": 3.5}), flush=True)
    # the fused ring against torch's fused attention on one process
    torch_one = run_distributed(measure, world_size=1, args=(1, fixed, cap, 64, "torch"), timeout=1800)[0]
    fused = {p: run_distributed(measure, world_size=p, args=(p, fixed, cap, 64 * p, "fused"), timeout=3600)[0]
             for p in (2, 4)}
    print(json.dumps({"name": "sequence_scaling_torch_fused", "sp": 1, "fixed_length": fixed,
                      "peak_mib": round(torch_one["fixed_peak"] / 2 ** 20, 1),
                      "peak_rss_mib": round(torch_one["fixed_peak_rss"] / 2 ** 20, 1), "cap_mib": cap >> 20,
                      "longest_length": torch_one["longest"]}), flush=True)
    for p, r in fused.items():
        print(json.dumps({"name": "sequence_scaling_fused_ring", "sp": p, "fixed_length": fixed,
                          "peak_mib": round(r["fixed_peak"] / 2 ** 20, 1),
                          "peak_rss_mib": round(r["fixed_peak_rss"] / 2 ** 20, 1),
                          "peak_vs_torch_fused": round(r["fixed_peak"] / torch_one["fixed_peak"], 3),
                          "cap_mib": cap >> 20, "longest_length": r["longest"],
                          "longest_vs_torch_fused": round(r["longest"] / torch_one["longest"], 2)}), flush=True)
    print(json.dumps({"name": "sequence_length_ratio_sp4_vs_fused",
                      "value": round(fused[4]["longest"] / torch_one["longest"], 2), "target": 3.5}), flush=True)
    print(json.dumps({"name": "sequence_peak_ratio_sp4_vs_fused",
                      "value": round(fused[4]["fixed_peak"] / torch_one["fixed_peak"], 3),
                      "target": round(1.15 / 4, 4)}), flush=True)
    t = timing(fixed, 3 if quick else 7)
    print(json.dumps({"name": "sequence_time_ratio_sp1_fused", "value": round(t["ring"] / t["torch"], 3),
                      "ring_s": round(t["ring"], 3), "torch_s": round(t["torch"], 3), "length": fixed,
                      "target": 1.1}), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
