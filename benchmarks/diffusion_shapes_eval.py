"""Did the default diffusion run learn? Colour accuracy of generated shapes, before and after.

For every pair of distinct palette colours (56 prompts such as "a red circle on a blue
background", shapes taking turns) the model draws `--images` images; an image scores when the
most frequent colour that is not the prompt's background is the prompt's shape colour. Chance
is 1/7. The same prompts, seeds and sampler are run on the fine-tuned model (the run's exported
pipeline or LoRA) and on the model it started from.

    python -m benchmarks.diffusion_shapes_eval [--run runs/diffusion-tiny] [--images 2]

Prints JSON lines: shapes_color_accuracy (after fine-tuning, with the untrained figure as its
baseline) and shapes_color_accuracy_untrained.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from apps.diffusion import quiet_libraries, shapes
from apps.diffusion.config import DiffusionRecipe
from apps.diffusion.pipeline import render, to_array
from apps.diffusion.prepare import tiny_folder
from apps.diffusion.sample import load_pipeline
from benchmarks._machine import machine
from core.config import load_recipe
from core.distributed import Layout, ParallelMesh


def accuracy(pipe, images: int, steps: int, guidance: float, seed: int, resolution: int) -> float:
    specs = shapes.eval_prompts()
    drawn = render(pipe, [shapes.caption(*s) for s in specs], images, steps, guidance, seed, resolution,
                   batch=len(specs))
    per_prompt = [s for s in specs for _ in range(images)]
    return shapes.colour_accuracy([to_array(im) for im in drawn], per_prompt)


def base_model(run: Path) -> Path:
    cfg = load_recipe(DiffusionRecipe, run / "config.yaml")
    if cfg.model.pretrained != "tiny":
        return Path(cfg.model.pretrained)
    return tiny_folder(cfg, ParallelMesh.build(Layout()).world, log=lambda m: print(m, file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/diffusion-tiny", help="output folder of a finetune run")
    ap.add_argument("--images", type=int, default=2, help="images per prompt")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    quiet_libraries()
    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        ap.error(f"{run} is not a finetune output folder (no config.yaml); run `make demo` first")
    cfg = load_recipe(DiffusionRecipe, run / "config.yaml")
    resolution = cfg.data.resolution
    device = torch.device("cpu")
    t0 = time.perf_counter()
    trained, _, _ = load_pipeline(run, device)
    after = accuracy(trained, args.images, args.steps, args.guidance, args.seed, resolution)
    untrained, _, _ = load_pipeline(base_model(run), device)
    before = accuracy(untrained, args.images, args.steps, args.guidance, args.seed, resolution)
    info = {"machine": machine(), "images": args.images * len(shapes.eval_prompts()), "steps": args.steps,
            "guidance": args.guidance, "run": str(run), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"name": "shapes_color_accuracy", "value": after, "unit": "fraction",
                      "baseline": before, "chance": shapes.CHANCE, "target": 0.7, **info}))
    print(json.dumps({"name": "shapes_color_accuracy_untrained", "value": before, "unit": "fraction",
                      "baseline": None, "chance": shapes.CHANCE, **info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
