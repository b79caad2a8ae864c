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

from apps.diffusion.model import check_pipeline_folder, check_weights_file
from apps.diffusion.pipeline import grid, render
from apps.diffusion import quiet_libraries
from core.errors import named
from core.run_folder import check_writable
from apps.diffusion.tokenizer import check_tokenizer
from core import cli
from core.distributed.launch import pick_device
from core.errors import LoomError


MODEL_FIX = "give a diffusers Stable Diffusion folder, or a Loom run folder (with pipeline/ or lora/)"


def resolve_model(model: str | Path) -> tuple[Path, Path | None]:
    """(the diffusers folder to load, the LoRA folder to apply or None) for `--model`, checked
    without loading anything; every error names --model and what the user gave."""
    path = Path(model).expanduser()
    subject = named("--model", model)
    lora = None
    if (path / "pipeline" / "model_index.json").is_file():
        return check_pipeline_folder(path / "pipeline", "--model", MODEL_FIX), None
    if (path / "lora" / "pytorch_lora_weights.safetensors").is_file():
        lora = path / "lora"
    elif (path / "pytorch_lora_weights.safetensors").is_file():
        lora = path
    if lora is None:
        if not (path / "model_index.json").is_file() and ((path / "config.yaml").is_file()
                                                           or (path / "checkpoints").is_dir()):
            raise LoomError(f"{subject} a Loom run folder without an exported pipeline/ or lora/ (the run has not "
                            f"finished); let it finish, or resume it with train.resume=latest")
        return check_pipeline_folder(path, "--model", MODEL_FIX), None
    for weights in lora.glob("*.safetensors"):
        check_weights_file(weights, subject, path)
    base_info = lora / "base_model.json"
    if not base_info.is_file():
        raise LoomError(f"{subject} {lora} holds LoRA weights but no base_model.json naming the model they adapt; "
                        f'write one such as {{"pretrained": "/path/to/stable-diffusion"}}')
    try:
        base = json.loads(base_info.read_text(encoding="utf-8"))["pretrained"]
        if not isinstance(base, str):
            raise TypeError(f"'pretrained' is a {type(base).__name__}")
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise LoomError(f"{subject} {base_info} does not name the base model ({type(e).__name__}: {e}); it must "
                        f'read {{"pretrained": "/path/to/stable-diffusion"}}') from None
    fix = f"correct {base_info}, or put the base model back in that place"
    return check_pipeline_folder(base, fix=fix, subject=f"{subject} its LoRA's base model {base} "
                                                        f"(named in {base_info.name})"), lora


def load_pipeline(model: str | Path, device: torch.device, resolved: tuple[Path, Path | None] | None = None):
    """A StableDiffusionPipeline from a diffusers folder or a Loom run folder (`resolved`: what
    `resolve_model(model)` returned, if it was called already)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder, lora = resolved or resolve_model(model)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise LoomError(f"{named('--model', model)} cannot load the pipeline in {folder}: "
                        f"{str(e).strip().splitlines()[0]}") from None
    check_tokenizer(pipe.tokenizer, folder / "tokenizer")
    if lora is not None:
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity(dlog.CRITICAL)     # diffusers logs the whole failure before raising it
        try:
            pipe.load_lora_weights(str(lora))
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
            detail = next((line for line in lines if "size mismatch" in line), lines[0]).rstrip(".")
            raise LoomError(f"{named('--model', model)} the LoRA weights in {lora} do not load onto {folder} ({detail}); "
                            f"were they trained on another base model?") from None
        finally:
            dlog.set_verbosity(level)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), folder, lora


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "prompt"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one LoomError line (like every Loom entry point)."""

    def error(self, message: str):
        raise LoomError(f"{message}; see python -m apps.diffusion.sample --help")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = _Parser(prog="python -m apps.diffusion.sample", description=__doc__.split("\n")[0])
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
    for flag, value in (("--num-images", args.num_images), ("--steps", args.steps)):
        if value < 1:
            raise LoomError(f"{flag} {value}: must be at least 1")
    if args.guidance < 0:
        raise LoomError(f"--guidance {args.guidance:g}: must be at least 0 (1 = no guidance)")
    if args.seed < 0:
        raise LoomError(f"--seed {args.seed}: must be at least 0")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        near = max(8, args.resolution // 8 * 8)
        raise LoomError(f"--resolution {args.resolution}: must be a positive multiple of 8 (Stable Diffusion's "
                        f"VAE downsamples by 8), e.g. {near}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise LoomError(f"--device cuda: this torch build sees no CUDA device (torch {torch.__version__}); "
                        f"use --device cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resolved = resolve_model(args.model)      # a bad --model fails before anything is imported or loaded
    loom_run = (Path(args.model) / "config.yaml").is_file()
    out = Path(args.out) if args.out else (Path(args.model) / "samples-cli" if loom_run else Path("samples"))
    check_writable(out, "--out")
    quiet_libraries()
    device = pick_device(args.device, 0)
    pipe, folder, lora = load_pipeline(args.model, device, resolved)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out.mkdir(parents=True, exist_ok=True)
    images = render(pipe, args.prompt, args.num_images, args.steps, args.guidance, args.seed, resolution)
    for i, prompt in enumerate(args.prompt):
        for n in range(args.num_images):
            images[i * args.num_images + n].save(out / f"{i:02d}-{slug(prompt)}-{n}.png")
    grid(images, args.num_images, scale=max(1, 256 // resolution)).save(out / "grid.png")
    what = f"{folder} + LoRA {lora}" if lora else str(folder)
    print(f"{len(images)} images from {what} in {out} (grid: {out / 'grid.png'})", file=sys.stderr)
    return 0


def console() -> None:
    """The installed command `loom-diffusion-sample`: `main` with Loom's exit statuses (`core.cli.run_main`)."""
    cli.run_main(main)


if __name__ == "__main__":
    console()
