"""What the diffusion app makes before training: the shapes set, the tiny model, class images.

Rank 0 makes each of them once (cached on disk, written atomically) while the other ranks wait.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from apps.diffusion import shapes
from apps.diffusion.config import DiffusionDataConfig, DiffusionRecipe
from apps.diffusion.data import list_images
from apps.diffusion.model import Parts
from apps.diffusion.pipeline import make_pipeline, render
from apps.diffusion.tiny import build_tiny, tiny_key
from core.cache import cache_dir
from core.distributed import comm
from core.distributed.comm import AxisGroup
from core.distributed.once import on_main_first

SHAPES_VERSION = 1


def cache_root(data: DiffusionDataConfig) -> Path:
    return cache_dir(data.cache_dir) / "diffusion"


def shapes_folder(data: DiffusionDataConfig, world: AxisGroup, seed: int = 0) -> Path:
    """The generated shapes set at `data.resolution` (made on first use)."""
    folder = cache_root(data) / f"shapes-v{SHAPES_VERSION}-{data.shapes_count}-{data.resolution}px-seed{seed}"
    on_main_first(world, lambda: shapes.generate(folder, data.shapes_count, data.resolution, seed),
                  "generating the shapes dataset")
    return folder


def tiny_folder(cfg: DiffusionRecipe, world: AxisGroup, log: Callable[[str], None]) -> Path:
    """The tiny Stable Diffusion (VAE warmed up on the shapes set), built on first use."""
    data_folder = shapes_folder(cfg.data, world)
    m = cfg.model
    key = tiny_key(m.tiny_width, m.tiny_vae_steps, data_folder, cfg.data.resolution, cfg.train.seed)
    folder = cache_root(cfg.data) / f"tiny-sd-{key}"

    def build() -> None:
        if not (folder / "model_index.json").is_file():
            build_tiny(folder, data_folder, cfg.data.resolution, m.tiny_width, m.tiny_vae_steps,
                       cfg.train.seed, log)

    on_main_first(world, build, "building the tiny Stable Diffusion")
    return folder


def class_images(cfg: DiffusionRecipe, parts: Parts, world: AxisGroup, log: Callable[[str], None],
                 together: bool = False) -> Path:
    """DreamBooth's class images: those in data.class_dir, and as many more as
    data.num_class_images asks for, rendered from data.class_prompt by the model as it will train
    (its weights in chunks within the memory budget, when the layout puts them there).

    Image i comes from seed 10000 + i, so the set does not depend on the world size; the ranks
    render the missing ones between them (image i on rank i mod world). `together`: every rank
    must take part in each forward (ZeRO-3 over several ranks gathers the weights), so each renders
    the same number of images, the ones past the end thrown away."""
    folder = Path(cfg.data.class_dir) if cfg.data.class_dir else Path(cfg.output.dir) / "class_images"
    have = on_main_first(world, lambda: _count(folder), "listing DreamBooth class images")
    if world.size > 1:
        have = int(comm.broadcast(torch.tensor([have or 0], device=world.device), world).item())
    missing = cfg.data.num_class_images - have
    if missing <= 0:
        return folder
    v = cfg.validation
    log(f"generating {missing} class images for '{cfg.data.class_prompt}' in {folder} "
        f"({v.steps} sampling steps each: validation.steps)")
    pipe = make_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.unet, parts.scheduler.config)
    mine = list(range(have + world.rank, cfg.data.num_class_images, world.size))
    rounds = -(-missing // world.size) if together else len(mine)
    bar = tqdm(range(rounds), desc="class images", unit="image", file=sys.stderr, mininterval=1.0,
               disable=world.rank != 0 or not cfg.train.progress)
    for r in bar:
        i = mine[r] if r < len(mine) else have      # past the end: rendered for the lockstep only
        with torch.no_grad():
            (image,) = render(pipe, [cfg.data.class_prompt], 1, v.steps, v.guidance_scale, seed=10_000 + i,
                              resolution=cfg.data.resolution)
        if r < len(mine):
            tmp = folder / f".class_{i:05d}.png.partial.{world.rank}"
            image.save(tmp, format="PNG")
            os.replace(tmp, folder / f"class_{i:05d}.png")
    comm.barrier(world)
    return folder


def _count(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return len(list_images(folder, "data.class_dir"))
