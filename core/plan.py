"""The auto-parallel planner's command.

    python -m core.plan --recipe gpt/gpt2-124m --cluster a100-8 [key=value ...] [--explain] [--top K]
    python -m core.plan calibrate [--out FILE]

The first prints the fastest layout that fits as a recipe overlay: YAML that `extends` the recipe
and sets parallel.*, memory.device_gb, train.micro_batch / global_batch and
model.gradient_checkpointing (with the command line's own key=value overrides folded in). Read it,
commit it, run it (`--out plan.yaml`, then `python -m apps.gpt.pretrain --recipe plan.yaml`), and
override any key on that command line. `--explain` adds the top K layouts with their predicted step
time, tokens/s and memory, and why the best of each other kind of layout lost. `calibrate` measures
this machine and writes a cluster file (`core.autoparallel.calibrate`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from core.autoparallel import GIB, alternatives, best_plan, load_cluster
from core.autoparallel.target import job_for, target_for
from core.cli import parse, run_main
from core.errors import LoomError

USAGE = """usage: python -m core.plan --recipe RECIPE --cluster CLUSTER [key=value ...] [--explain] [--top K]
                        [--out FILE]
       python -m core.plan calibrate [--out FILE] [--quick]

Pick the parallel layout for a recipe on a cluster; print it as a recipe that extends RECIPE.

  --recipe RECIPE    a recipe name (gpt/gpt2-124m) or file; its app's model is profiled on the meta device
  --cluster CLUSTER  a cluster file, or a name under recipes/clusters/ (a100-8, a100-1024, gpu-8gb-nvme)
  --app APP          the app, when the recipe file is not in recipes/<app>/
  --explain          the top K layouts and why the other kinds of layout lost (on stderr)
  --top K            how many layouts --explain lists (default 5)
  --out FILE         also write the plan there (run it with --recipe FILE)
  key=value          recipe overrides, as the app takes them (model.n_layer=48 train.global_batch=1024)
"""


def _options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m core.plan", add_help=False)
    ap.add_argument("--cluster", default="")
    ap.add_argument("--app", default="")
    ap.add_argument("--explain", action="store_true")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--out", default="")
    return ap.parse_known_args(argv)


def recipe_overlay(recipe: str, argv: list[str], plan: dict) -> dict:
    """The plan as a recipe: `extends` the planned one, with the command line's overrides, then the plan."""
    base = recipe if not Path(recipe).is_file() else str(Path(recipe).resolve())
    out: dict = {"extends": base}
    for arg in argv:
        if "=" in arg and not arg.startswith("-"):
            key, value = arg.split("=", 1)
            _put(out, key.split("."), yaml.safe_load(value))
    for section, keys in plan.items():
        for key, value in keys.items():
            _put(out, [section, key], value)
    return out


def _put(tree: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def explain(plan, top: int) -> str:
    lines = [f"cluster: {plan.cluster.describe()}",
             f"model: {plan.job.profile.describe()}", *(f"  note: {n}" for n in plan.job.profile.notes),
             f"job: global batch {plan.job.global_batch}"
             + (f" x {plan.job.seq_len} tokens" if plan.job.profile.unit == "tokens" else f" {plan.job.profile.unit}")
             + f", {plan.job.precision}, "
             f"{plan.job.optimizer}; {plan.result.visited:,} layouts scored over {plan.result.shapes:,} shapes",
             "", f"top {min(top, len(plan.result.ranked))} layouts (predicted):"]
    for i, est in enumerate(plan.result.ranked[:top], 1):
        lines.append(f"  {i}. {est.line()}")
        busy = ", ".join(f"{k} {v:.3g} s" for k, v in est.times.items() if v > 0)
        lines.append(f"     per step: {busy}")
    lines += ["", "why the other kinds of layout lost:"]
    for name, rival, why in alternatives(plan):
        lines.append(f"  {name}: {why}" + (f"\n     best of them: {rival.line()}" if rival else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "calibrate":
        from core.autoparallel.calibrate import main as calibrate

        return calibrate(argv[1:])
    opts, rest = _options(argv)
    if "-h" in rest or "--help" in rest or not argv:
        print(USAGE)
        return 0
    if not opts.cluster:
        raise LoomError("--cluster is needed: a cluster file, or a name under recipes/clusters/ "
                        "(python -m core.plan calibrate writes one for this machine)")
    recipe = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--recipe"), "")
    recipe = recipe or next((a.split("=", 1)[1] for a in rest if a.startswith("--recipe=")), "")
    if not recipe:
        raise LoomError("--recipe is needed (for example --recipe gpt/gpt2-124m)")
    target = target_for(recipe, opts.app)
    cfg = parse(target.recipe, rest, prog="python -m core.plan", summary="", default_recipe=target.default_recipe)
    cluster = load_cluster(opts.cluster)
    t0 = time.perf_counter()
    job = job_for(target, cfg, cluster.devices)
    plan = best_plan(job, cluster, top=max(opts.top, 1))     # a PlanError says what would fit
    took = time.perf_counter() - t0
    text = (f"# {plan.line()}\n# planned in {took:.2f} s; run it with --recipe THIS_FILE, override any key\n"
            + yaml.safe_dump(recipe_overlay(recipe, rest, plan.overlay), sort_keys=False))
    if opts.out:
        out = Path(opts.out)
        if not out.parent.is_dir():
            raise LoomError(f"--out {opts.out}: the folder {out.parent} does not exist")
        part = out.with_name(out.name + ".part")
        part.write_text(text)
        part.replace(out)                                   # never a half-written plan
    print(text, end="")
    if opts.explain:
        print("\n" + explain(plan, opts.top), file=sys.stderr)
    best = plan.best
    print(f"predicted: {best.step_s:.4g} s/step, {best.tokens_per_s:,.0f} {best.unit}/s, "
          f"{best.device_bytes / GIB:.2f} GiB per device", file=sys.stderr)
    return 0


def console() -> None:
    run_main(main)


if __name__ == "__main__":
    console()
