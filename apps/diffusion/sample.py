"""Prompts in, PNG images and a grid out.

    python -m apps.diffusion.sample --model runs/diffusion-tiny --prompt "a red circle on a blue background"

`--model` takes a diffusers Stable Diffusion folder, or a Loom output folder: its `pipeline/`
(full fine-tune) or its `lora/` on top of the base model it names. Images go to `--out`
(default: `<model>/samples-cli` for a Loom folder, else `./samples`) as `<prompt>-<n>.png`,
with all of them in `grid.png`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from apps.diffusion.model import check_pipeline_folder
from apps.diffusion.pipeline import grid, render
from apps.diffusion import quiet_libraries
from core import cli
from core.distributed.launch import pick_device
from core.errors import LoomError


def load_pipeline(model: str | Path, device: torch.device):
    """A StableDiffusionPipeline from a diffusers folder or a Loom run folder."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = Path(model).expanduser()
    lora = None
    if (path / "pipeline" / "model_index.json").is_file():
        path = path / "pipeline"
    elif (path / "lora" / "pytorch_lora_weights.safetensors").is_file():
        lora = path / "lora"
    elif (path / "pytorch_lora_weights.safetensors").is_file():
        lora = path
    if lora is not None:
        base_info = lora / "base_model.json"
        if not base_info.is_file():
            raise LoomError(f"{lora} holds LoRA weights but no base_model.json naming the model they adapt")
        path = Path(json.loads(base_info.read_text())["pretrained"])
    folder = check_pipeline_folder(path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise LoomError(f"cannot load the pipeline in {folder}: {str(e).splitlines()[0]}") from None
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), folder, lora


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m apps.diffusion.sample", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="diffusers folder, or a Loom run folder")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for more")
    ap.add_argument("--num-images", type=int, default=4, help="images per prompt (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps (default: %(default)s)")
    ap.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: %(default)s)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels; default: the model's own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = ap.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        ap.error("--num-images and --steps must be at least 1")
    if args.resolution is not None and args.resolution % 8:
        ap.error(f"--resolution {args.resolution} is not a multiple of 8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    device = pick_device(args.device, 0)
    pipe, folder, lora = load_pipeline(args.model, device)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    loom_run = (Path(args.model) / "config.yaml").is_file()
    out = Path(args.out) if args.out else (Path(args.model) / "samples-cli" if loom_run else Path("samples"))
    out.mkdir(parents=True, exist_ok=True)
    images = render(pipe, args.prompt, args.num_images, args.steps, args.guidance, args.seed, resolution)
    for i, prompt in enumerate(args.prompt):
        for n in range(args.num_images):
            images[i * args.num_images + n].save(out / f"{i:02d}-{slug(prompt)}-{n}.png")
    grid(images, args.num_images, scale=max(1, 256 // resolution)).save(out / "grid.png")
    what = f"{folder} + LoRA {lora}" if lora else str(folder)
    print(f"{len(images)} images from {what} in {out} (grid: {out / 'grid.png'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run_main(main)
