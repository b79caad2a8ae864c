"""Generation from a model larger than the memory it may use: Loom's streamed weights against
Hugging Face accelerate's big-model inference, in the same run, under the same cgroup memory cap.

    python -m benchmarks.offload_inference --quick     # OPT-125M shape, 1 GiB cap, 160 MiB for weights
    python -m benchmarks.offload_inference             # OPT-6.7B shape (13 GB bf16), 4 GiB cap: long

An OPT-architecture model with random bf16 weights is built on the meta device and written tensor by
tensor as a Hugging Face folder (config.json + model.safetensors; never whole in memory). Each side
runs in a child process inside a cgroup whose limit is the cap, generating `--new` tokens greedily
after `--prompt`-token prompts (random ids, one seed), with the same budget for weights in memory:

- loom: the path `python -m apps.gpt.generate` takes (`apps.gpt.generate.meta_model`,
  `core.inference.runner.build_engine`, `Engine.generate`) with `memory.device_gb=BUDGET
  parallel.offload=nvme`: weights in a pre-allocated file (read through the page cache and dropped
  from it, or with `--direct-io`), read ahead while the layer before computes. Once at batch 8
  with the same budget (`loom_n1`), once in the throughput mode with the number of micro-batches
  and the weight budget the placement picks from the memory the cap leaves (`loom_best`: N
  micro-batches of 8 rows through each layer per weight pass, their KV caches competing with the
  weights for that memory).
- accelerate: `load_checkpoint_and_dispatch(device_map="auto", max_memory={"cpu": BUDGET},
  offload_folder=...)` and transformers' `generate` at batch 8 (accelerate is the benchmark's
  optional extra: `pip install -e ".[bench]"`; without it that side is skipped and said so). If it
  is killed at the cap with that budget, it runs again with half, then a quarter of it.
- in memory (no cap): Loom's engine with every weight in memory, at batch 8: its token ids must
  equal the streamed run's.

Prints JSON lines: tokens/s of each side, `offload_inference_speedup_vs_accelerate` (loom_n1 ÷
accelerate, target ≥ 2) and `..._throughput_mode` (loom_best ÷ accelerate, target ≥ 5), and
`offload_inference_disk_bound_fraction`: Loom's tokens/s ÷ the bound the disk sets (the rows of a
pass ÷ (bytes of weights read per pass ÷ the disk's sequential read speed, the faster of buffered
and direct reads, measured just before that run: this disk's speed drifts by 2x over minutes);
target ≥ 0.7).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._machine import machine

SHAPES = {   # hidden, layers, heads, ffn (OPT's published sizes; vocabulary 50272, 2048 positions)
    "opt-125m": (768, 12, 12, 3072),
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
    "opt-13b": (5120, 40, 40, 20480),
}


def opt_config(shape: str):
    from transformers import OPTConfig

    hidden, layers, heads, ffn = SHAPES[shape]
    return OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, max_position_embeddings=2048, word_embed_proj_dim=hidden, do_layer_norm_before=True,
                     torch_dtype="bfloat16", architectures=["OPTForCausalLM"])


def write_model(shape: str, folder: Path) -> Path:
    """A Hugging Face OPT folder with random bf16 weights, one tensor in memory at a time."""
    from transformers import OPTForCausalLM

    from core.checkpoint.stream import SafetensorsWriter

    done = folder / "model.safetensors"
    if done.is_file() and (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = opt_config(shape)
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    specs = {n: (torch.bfloat16, p.shape) for n, p in model.state_dict().items() if n != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    with SafetensorsWriter(folder / "partial.safetensors", specs, metadata={"format": "pt"}) as w:
        for name, (dtype, shape_) in specs.items():
            if name.endswith("bias"):
                value = torch.zeros(shape_)
            elif "layer_norm" in name:
                value = torch.ones(shape_)
            else:
                value = torch.empty(shape_).normal_(0.0, 0.02, generator=g)
            w.put(name, value.to(dtype))
    os.replace(folder / "partial.safetensors", done)
    config.save_pretrained(folder)
    return folder


def disk_speeds(folder: Path, mb: int) -> dict:
    """Sequential read speed (GB/s) of a fresh `mb` MiB file in `folder`: through the page cache
    (dropped first) and with direct IO in 32 MiB requests, as Loom's store reads."""
    from core.autoparallel.calibrate import disk_gbs
    from core.memory.store import aligned_empty

    buffered = disk_gbs(folder, mb)[1]
    path = Path(tempfile.mkstemp(dir=folder, prefix="loom-bench-disk-")[1])
    try:
        piece = 32 << 20
        buf = aligned_empty(piece)
        with open(path, "wb") as f:
            for _ in range(mb * 2**20 // piece):
                f.write(os.urandom(1 << 20) * (piece >> 20))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        try:
            import ctypes

            view = (ctypes.c_char * piece).from_address(buf.data_ptr())
            t0 = time.perf_counter()
            for off in range(0, mb * 2**20, piece):
                os.preadv(fd, [view], off)
            direct = mb * 2**20 / (time.perf_counter() - t0) / 1e9
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return {"buffered_gbs": round(buffered, 3), "direct_gbs": round(direct, 3)}


def prompts(count: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(4, 50000, (count, length), generator=g).tolist()


# ---------------------------------------------------------------------------------------------- children

def child_loom(spec: dict) -> dict:
    from apps.gpt.generate import meta_model
    from core.inference.runner import Settings, build_engine

    folder = Path(spec["folder"])
    rows = prompts(spec["rows"], spec["prompt"])
    t0 = time.perf_counter()
    model, materialize, _ = meta_model(folder)
    settings = Settings(device_gb=spec["budget_gb"], offload=spec["offload"], nvme_dir=spec["nvme_dir"],
                        micro_batches=spec["micro_batches"], direct_io=spec.get("direct_io", True),
                        io_threads=spec.get("io_threads", 0), decode_threads=spec.get("decode_threads", 0))
    engine, placement = build_engine(model, materialize, torch.device("cpu"), torch.bfloat16, settings,
                                     spec["batch"], spec["prompt"], spec["new"], len(rows))
    del materialize
    built = time.perf_counter() - t0
    try:
        result = engine.generate(rows, spec["new"], spec["batch"], placement.micro_batches, temperature=0.0)
    finally:
        engine.close()
    return {"tokens_per_s": result.tokens_per_second, "seconds": result.seconds, "build_s": built,
            "weight_budget_gib": placement.weight_budget / 2**30,
            "prefill_s": result.prefill_seconds, "passes": result.passes, "rows": len(rows),
            "rows_per_pass": spec["batch"] * placement.micro_batches, "bytes_read": result.bytes_read,
            "wait_s": result.wait_seconds, "micro_batches": placement.micro_batches,
            "placement": placement.summary(), "predicted_tokens_per_s": placement.tokens_per_second,
            "tokens": result.tokens[:spec["batch"]], "peak_rss_gib": _peak_rss()}


def child_accelerate(spec: dict) -> dict:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(spec["folder"])
    rows = prompts(spec["rows"], spec["prompt"])
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.tie_weights()
    budget = int(spec["budget_gb"] * 2**30)
    model = load_checkpoint_and_dispatch(model, str(folder), device_map="auto", max_memory={"cpu": budget},
                                         offload_folder=spec["offload_folder"], dtype=torch.bfloat16,
                                         no_split_module_classes=["OPTDecoderLayer"])
    model.eval()
    built = time.perf_counter() - t0
    ids = torch.tensor(rows)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec["new"],
                             min_new_tokens=spec["new"], do_sample=False, pad_token_id=1)
    seconds = time.perf_counter() - t0
    places = sorted({str(v) for v in getattr(model, "hf_device_map", {}).values()})
    return {"tokens_per_s": len(rows) * spec["new"] / seconds, "seconds": seconds, "build_s": built,
            "rows": len(rows), "device_map_places": places, "tokens": out[:, ids.shape[1]:].tolist(),
            "peak_rss_gib": _peak_rss()}


def _peak_rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(which: str, spec: dict) -> int:
    torch.manual_seed(0)
    out = child_loom(spec) if which == "loom" else child_accelerate(spec)
    print("RESULT " + json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------- parent

def run_child(which: str, spec: dict, cap, timeout: float) -> dict | None:
    argv = [sys.executable, "-m", "benchmarks.offload_inference", "--child", which, "--spec", json.dumps(spec)]
    disk = disk_speeds(Path(spec["nvme_dir"]), 512)        # the disk's speed drifts: measured beside each run
    t0 = time.perf_counter()
    if cap is None:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    else:
        cap.reset_peak()
        r = cap.run(argv, timeout)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        why = "killed at the memory cap" if r.returncode in (137, -9) else f"exit {r.returncode}"
        tail = (r.stderr or "").strip().splitlines()[-3:]
        print(f"{which}: failed ({why}): {' | '.join(tail)}", file=sys.stderr)
        return None
    result = json.loads(line[len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t0
    result["disk_before"] = disk
    if cap is not None and cap.peak() is not None:
        result["cgroup_peak_gib"] = cap.peak() / 2**30       # includes the page cache
    shown = {k: v for k, v in result.items() if k != "tokens"}
    print(f"{which}: {json.dumps(shown)}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="OPT-125M shape, 1 GiB cap, 160 MiB of weights in memory")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--cap-gb", type=float, default=None, help="cgroup memory cap of each child")
    ap.add_argument("--budget-gb", type=float, default=None, help="weights held in memory (both sides)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--max-micro-batches", type=int, default=8, help="prompts = batch x this; the placement picks N")
    ap.add_argument("--folder", default="", help="where the model folder is written (kept for reuse)")
    ap.add_argument("--nvme-dir", default="", help="the disk both sides offload to (default: the system's temp)")
    ap.add_argument("--no-peer", action="store_true", help="skip accelerate")
    ap.add_argument("--direct-io", action="store_true", help="Loom reads NVMe with direct IO instead of through "
                    "the page cache (dropping what it read), its default")
    ap.add_argument("--io-threads", type=int, default=0, help="Loom's reading threads (0: its default)")
    ap.add_argument("--only", choices=("loom_n1", "loom_best", "accelerate", "in_memory"), nargs="*",
                    help="run only these sides")
    ap.add_argument("--child", choices=("loom", "accelerate"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, json.loads(args.spec))
    shape = args.shape or ("opt-125m" if args.quick else "opt-6.7b")
    cap_gb = args.cap_gb or (1.0 if args.quick else 4.0)
    budget_gb = args.budget_gb or (0.15625 if args.quick else 2.0)
    from benchmarks.memory_capacity import MemoryCap

    scratch = Path(args.nvme_dir or tempfile.gettempdir())
    folder = Path(args.folder) if args.folder else scratch / f"loom-bench-{shape}"
    t0 = time.perf_counter()
    write_model(shape, folder)
    weights = (folder / "model.safetensors").stat().st_size
    print(f"model: {shape}, {weights / 2**30:.2f} GiB of bf16 weights in {folder} ({time.perf_counter() - t0:.0f} s); "
          f"cap {cap_gb} GiB, {budget_gb} GiB for weights", file=sys.stderr)
    first = disk_speeds(scratch, 512)
    print(f"disk: sequential read {first['buffered_gbs']:.2f} GB/s through the page cache, {first['direct_gbs']:.2f} "
          f"GB/s with direct IO", file=sys.stderr)
    base = {"folder": str(folder), "budget_gb": budget_gb, "prompt": args.prompt, "new": args.new,
            "batch": args.batch, "nvme_dir": str(scratch), "offload": "nvme", "direct_io": args.direct_io,
            "io_threads": args.io_threads}
    wanted = set(args.only or ("loom_n1", "loom_best", "accelerate", "in_memory"))
    info = machine()
    results: dict[str, dict | None] = {}
    cap = MemoryCap(int(cap_gb * 2**30))
    timeout = 600 if args.quick else 7200
    try:
        if "loom_n1" in wanted:
            results["loom_n1"] = run_child("loom", {**base, "rows": args.batch, "micro_batches": 1}, cap, timeout)
        if "loom_best" in wanted:
            # the throughput mode places the budget itself: what memory the cap leaves goes to weights
            # or to the KV cache of more micro-batches, whichever the cost model predicts faster
            results["loom_best"] = run_child("loom", {**base, "rows": args.batch * args.max_micro_batches,
                                                      "micro_batches": 0, "budget_gb": 0.0}, cap, timeout)
        if not args.no_peer and "accelerate" in wanted:
            if importlib.util.find_spec("accelerate") is None:
                print("accelerate is not installed (pip install -e '.[bench]'): that side is skipped", file=sys.stderr)
            else:
                # accelerate's own budget is what it may keep in memory; where it is killed at the cap
                # with the budget Loom used, it gets half, then a quarter (its peak is said either way)
                for share in (1.0, 0.5, 0.25):
                    offload = Path(tempfile.mkdtemp(prefix="loom-bench-accelerate-", dir=scratch))
                    try:
                        spec = {**base, "rows": args.batch, "offload_folder": str(offload),
                                "budget_gb": budget_gb * share}
                        results["accelerate"] = run_child("accelerate", spec, cap, timeout)
                    finally:
                        shutil.rmtree(offload, ignore_errors=True)
                    if results["accelerate"] is not None:
                        results["accelerate"]["budget_gb"] = budget_gb * share
                        break
    finally:
        cap.close()
    if "in_memory" in wanted:
        results["in_memory"] = run_child("loom", {**base, "rows": args.batch, "micro_batches": 1, "offload": "none",
                                                  "budget_gb": 0.0}, None, timeout)
    for name, r in results.items():
        if r is not None:
            shown = {k: v for k, v in r.items() if k != "tokens"}
            print(json.dumps({"name": f"offload_inference_{name}", **shown, "machine": info}))
    n1, best, peer, ref = (results.get(k) for k in ("loom_n1", "loom_best", "accelerate", "in_memory"))
    if n1 and ref:
        same = n1["tokens"] == ref["tokens"]
        best_same = None if best is None else best["tokens"] == ref["tokens"]      # None: not run
        print(json.dumps({"name": "offload_inference_tokens_equal_in_memory", "value": same and best_same is not False,
                          "loom_n1": same, "loom_best_first_micro_batch": best_same}))
    if peer and n1:
        agree = sum(a == b for x, y in zip(n1["tokens"], peer["tokens"]) for a, b in zip(x, y))
        total = sum(len(x) for x in n1["tokens"])
        common = {"unit": "x", "shape": shape, "cap_gb": cap_gb, "budget_gb": budget_gb, "batch": args.batch,
                  "baseline": "accelerate load_checkpoint_and_dispatch(device_map='auto', offload_folder) + "
                              "transformers generate, same cap, budget and prompts", "machine": info,
                  "greedy_tokens_agreeing_with_accelerate": f"{agree}/{total}"}
        print(json.dumps({"name": "offload_inference_speedup_vs_accelerate",
                          "value": n1["tokens_per_s"] / peer["tokens_per_s"], "target": 2.0, **common}))
        if best:
            print(json.dumps({"name": "offload_inference_speedup_vs_accelerate_throughput_mode",
                              "value": best["tokens_per_s"] / peer["tokens_per_s"], "target": 5.0,
                              "micro_batches": best["micro_batches"], **common}))
    for name, r in (("n1", n1), ("best", best)):
        if r and r["bytes_read"]:
            # the bound: the disk's sequential read speed (the faster of its two measured ways, measured
            # just before the run) turned into passes per second, times the rows of a pass
            per_pass = r["bytes_read"] / r["passes"]
            speed = max(r["disk_before"].values())
            bound = r["rows_per_pass"] / (per_pass / (speed * 1e9))
            print(json.dumps({"name": f"offload_inference_disk_bound_fraction_{name}",
                              "value": r["tokens_per_s"] / bound, "target": 0.7, "unit": "x",
                              "bytes_read_per_pass": per_pass, "disk": r["disk_before"],
                              "bound_tokens_per_s": bound,
                              "read_gbs_achieved": r["bytes_read"] / r["seconds"] / 1e9}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
