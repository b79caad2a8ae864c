"""The longest protein that folds under a memory cap: OpenFold's own Evoformer at its long-sequence
settings against Loom's, both inside the same OpenFold AlphaFold.

    python -m benchmarks.protein_long_sequence                  # 6 GiB cap (hours on 2 CPU cores)
    python -m benchmarks.protein_long_sequence --cap-gib 1.0    # the README's figures (1.5 hours or more)
    python -m benchmarks.protein_long_sequence --skip-search    # only the L=256 timing and DAP rows

The model is AlphaFold model_1 at its channel sizes (c_m=256, c_z=128, c_e=64) with 2 Evoformer
blocks, 1 extra-MSA block, the preset's 8 structure-module iterations and one recycle (two
passes), in single-sequence mode (one MSA row, one extra row), random weights, fp32. A trial is
`python -m apps.protein.infer` on a generated sequence of length L in a child process inside a
cgroup whose memory limit is the cap (every byte the child touches counts; no swap); a length
"fits" when the child writes its PDB and exits 0.

- openfold: `model.engine=openfold model.chunk_size=4 model.use_lma=true`: OpenFold's
  long-sequence settings (chunked modules, low-memory attention, in-place updates at inference,
  no chunk-size tuner). Its `offload_inference` moves tensors from the GPU to the host, which
  saves nothing where the host is the device, so it is left off.
- loom: `model.engine=loom` with the app's default budget (`memory.budget_gb=0`: what is free when
  the stack starts, the cgroup's limit included, less 10% of it or 128 MiB, whichever is more):
  Loom's stacks with chunks planned to it, and `memory.spill_dir=runs/protein-spill` (on the
  repository's disk; /tmp may be tmpfs), where the strip triangle multiplication keeps the
  updates that wait for later rows when the Evoformer does not fit in memory with them (the
  planner uses it only then; a trial row says how many GiB went through it). `--loom-budget-gib`
  sets `memory.budget_gb` instead; `--no-spill` leaves the spill folder out.

Search: galloping from --start then bisection, in steps of --step residues. Then both engines
fold L=256 without a cap (time ratio), and Loom folds --dap-length residues (384) on 1, 2 and 4
processes with axial parallelism (`--dap`: only these rows; --dap-budget-gib sets every rank's
chunk budget alike). Of each, rank 0's peak: the whole process's (`peak_gib`, the most resident
memory during the fold) and the fold's own (`fold_peak_gib`: that peak less what the process held
when the fold began: the interpreter, torch, OpenFold's code and the weights, about 0.33 GiB here,
which no number of processes divides).
Prints JSON lines: every trial, then `protein_max_len_ratio` (loom / openfold), the two
lengths, `protein_time_ratio_L256` (openfold seconds / loom seconds: above 1 means Loom is
faster), `protein_dap_peak_gib` per process count and `protein_dap_peak_ratio_p2` / `_p4` (the
fold's peak on 2 / 4 processes over one process's; targets 0.6 / 0.35; `whole_process_ratio`
beside it).

    python -m benchmarks.protein_long_sequence --dap            # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._machine import machine
from benchmarks.memory_capacity import MemoryCap, largest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.evoformer_blocks=2", "model.extra_msa_blocks=1", "model.structure_blocks=0", "model.recycles=1",
         "data.max_msa_clusters=1", "data.max_extra_msa=1"]
ENGINES = {"openfold": ["model.engine=openfold", "model.chunk_size=4", "model.use_lma=true"],
           "loom": ["model.engine=loom"]}


def _fasta(folder: Path, length: int) -> Path:
    rng = random.Random(length)
    path = folder / f"L{length}.fasta"
    path.write_text(f">L{length}\n" + "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(length)) + "\n")
    return path


def _command(engine: str, length: int, work: Path, extra: list[str], launcher: list[str] | None = None) -> list[str]:
    out = work / f"{engine}-{length}-{time.monotonic_ns()}"
    head = launcher or [sys.executable, "-m", "apps.protein.infer"]
    return head + MODEL + ENGINES[engine] + extra + [f"data.fasta={_fasta(work, length)}", f"output.dir={out}"]


def _result(r: subprocess.CompletedProcess, row: dict, out_dir: Path | None) -> dict:
    if r.returncode == 0 and out_dir is not None:
        timings = json.loads(next(out_dir.glob("*/timings.json")).read_text())
        row.update(inference_s=round(timings["inference_s"], 1), peak_gib=round(timings["peak_memory_gib"], 3))
        if "held_before_gib" in timings:                       # what the fold itself added at its peak
            row["fold_peak_gib"] = round(timings["peak_memory_gib"] - timings["held_before_gib"], 3)
        if timings.get("spilled_gib"):
            row["spilled_gib"] = round(timings["spilled_gib"], 2)
    elif r.returncode != 0:
        last = (r.stderr or "").strip().splitlines()
        row["why"] = ("over the memory cap (killed)" if r.returncode in (137, -9) else
                      "timeout" if r.stderr == "timeout" else (last[-1][:300] if last else f"exit {r.returncode}"))
    print(json.dumps(row), flush=True)
    return row


def trial(cap: MemoryCap, engine: str, length: int, work: Path, extra: list[str], timeout: float) -> bool:
    argv = _command(engine, length, work, extra)
    cap.reset_peak()
    t = time.perf_counter()
    r = cap.run(argv, timeout)
    row = {"name": "protein_trial", "engine": engine, "length": length, "fits": r.returncode == 0,
           "seconds": round(time.perf_counter() - t, 1)}
    peak = cap.peak()
    if peak is not None:
        row["cgroup_peak_gib"] = round(peak / 2**30, 3)
    return _result(r, row, Path(argv[-1].split("=", 1)[1]))["fits"]


def uncapped(engine: str, length: int, work: Path, extra: list[str], timeout: float, procs: int = 1) -> dict:
    launcher = None
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                    "-m", "apps.protein.infer"]
    argv = _command(engine, length, work, extra, launcher)
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        r = subprocess.CompletedProcess(argv, -1, "", "timeout")
    row = {"name": "protein_run", "engine": engine, "length": length, "processes": procs, "ok": r.returncode == 0}
    return _result(r, row, Path(argv[-1].split("=", 1)[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-gib", type=float, default=6.0, help="the memory cap of every trial")
    ap.add_argument("--step", type=int, default=32, help="lengths are searched in multiples of this")
    ap.add_argument("--start", type=int, default=0, help="first length tried (default: a guess from the cap)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds before a trial is given up")
    ap.add_argument("--skip-search", action="store_true", help="only the L=256 timing and the DAP rows")
    ap.add_argument("--dap", action="store_true", help="only the axial-parallelism (DAP) rows")
    ap.add_argument("--dap-length", type=int, default=384, help="the sequence length of the DAP rows")
    ap.add_argument("--dap-processes", default="1,2,4", help="the process counts of the DAP rows ('': none)")
    ap.add_argument("--dap-budget-gib", type=float, default=64.0, help="each rank's chunk budget in the DAP rows")
    ap.add_argument("--loom-budget-gib", type=float, default=0.0,
                    help="memory.budget_gb of the loom trials (0: the app's default, what is free less a reserve)")
    ap.add_argument("--no-spill", action="store_true",
                    help="loom trials without memory.spill_dir (everything in memory)")
    ap.add_argument("--engines", default="openfold,loom", help="whose longest length to search (the ratio needs both)")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    print(json.dumps({"name": "machine", **machine(), "cap_gib": args.cap_gib}), flush=True)
    work = Path(tempfile.mkdtemp(prefix="loom-protein-"))
    if not args.skip_search and not args.dap:
        cap = MemoryCap(int(args.cap_gib * 2**30))
        try:
            start = args.start or int(480 * (args.cap_gib / 1.5) ** 0.5)
            budget = [f"memory.budget_gb={args.loom_budget_gib}"]
            if not args.no_spill:
                budget.append(f"memory.spill_dir={ROOT / 'runs' / 'protein-spill'}")    # a disk, not tmpfs
            lengths = {}
            for engine, extra in (("openfold", []), ("loom", budget)):
                if engine not in args.engines.split(","):
                    continue
                fits = lambda k, e=engine, x=extra: trial(cap, e, k * args.step, work, x, args.timeout)  # noqa: E731
                lengths[engine] = largest(fits, max(1, start // args.step), 4096 // args.step * 8) * args.step
            for engine, length in lengths.items():
                print(json.dumps({"name": "protein_max_len", "engine": engine, "value": length, "unit": "residues",
                                  "cap_gib": args.cap_gib, "step": args.step}), flush=True)
            if len(lengths) == 2:
                ratio = lengths["loom"] / max(lengths["openfold"], 1)
                print(json.dumps({"name": "protein_max_len_ratio", "value": round(ratio, 3), "unit": "x",
                                  "loom_length": lengths["loom"], "openfold_length": lengths["openfold"],
                                  "cap_gib": args.cap_gib, "step": args.step, "target": 2.0}), flush=True)
        finally:
            cap.close()
    if not args.dap:
        runs = {e: uncapped(e, 256, work, [], args.timeout) for e in ENGINES}
        if all(r["ok"] for r in runs.values()):
            print(json.dumps({"name": "protein_time_ratio_L256", "value": round(runs["openfold"]["inference_s"] /
                                                                                runs["loom"]["inference_s"], 3),
                              "unit": "x (openfold s / loom s)", "openfold_s": runs["openfold"]["inference_s"],
                              "loom_s": runs["loom"]["inference_s"], "target": 1.0}), flush=True)
    dap = {}
    for procs in [int(p) for p in args.dap_processes.split(",") if p]:
        row = uncapped("loom", args.dap_length, work, [f"memory.budget_gb={args.dap_budget_gib}"], args.timeout, procs)
        if row["ok"]:
            dap[procs] = row
            print(json.dumps({"name": "protein_dap_peak_gib", "processes": procs, "value": row["peak_gib"],
                              "fold_peak_gib": row.get("fold_peak_gib"), "unit": "GiB (rank 0)",
                              "inference_s": row["inference_s"], "length": args.dap_length}), flush=True)
    for procs, target in ((2, 0.6), (4, 0.35)):
        if 1 in dap and procs in dap and dap[1].get("fold_peak_gib"):
            print(json.dumps({"name": f"protein_dap_peak_ratio_p{procs}",
                              "value": round(dap[procs]["fold_peak_gib"] / dap[1]["fold_peak_gib"], 3),
                              "unit": "x (rank 0's fold peak on p processes / one process's)",
                              "whole_process_ratio": round(dap[procs]["peak_gib"] / dap[1]["peak_gib"], 3),
                              "length": args.dap_length, "target": target}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
