"""Sampling images and writing what a user takes elsewhere.

`make_pipeline` assembles a diffusers `StableDiffusionPipeline` from the parts in memory, so the
images rendered while training come from exactly the code a user will run on the exported
folder. `export_pipeline` writes a full diffusers folder; `export_lora` writes
`pytorch_lora_weights.safetensors` for `pipe.load_lora_weights`. Both publish atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from core.checkpoint.stream import state_specs, write_parts

Weights = Callable[[torch.nn.Module], Iterator[dict[str, torch.Tensor]]]   # Session.weights


def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler_config):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def render(pipe, prompts: Sequence[str], per_prompt: int, steps: int, guidance: float, seed: int,
           resolution: int | None = None, batch: int = 1) -> list[Image.Image]:
    """`per_prompt` images for each prompt, in prompt order, from fixed seeds: prompt i's noise is
    drawn from a generator seeded `seed + i`, so an image does not depend on the other prompts.
    `batch` prompts go through the UNet together (one denoising pass for all of them: what makes
    scoring dozens of small prompts cheap, and under chunked weights one stream of the weights per
    step instead of one per prompt)."""
    device = pipe.unet.device
    f = pipe.vae_scale_factor
    size = resolution or pipe.unet.config.sample_size * f
    shape = (per_prompt, pipe.unet.config.in_channels, size // f, size // f)
    images = []
    for start in range(0, len(prompts), batch):
        group = list(prompts[start:start + batch])
        generators = [torch.Generator(device="cpu").manual_seed(seed + start + j) for j in range(len(group))]
        latents = torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device)
        out = pipe(group if batch > 1 else group[0], num_images_per_prompt=per_prompt, num_inference_steps=steps,
                   guidance_scale=guidance, height=size, width=size, latents=latents,
                   generator=[g for g in generators for _ in range(per_prompt)] if batch > 1 else generators[0],
                   output_type="pil")
        images.extend(out.images)
    return images


def grid(images: Sequence[Image.Image], columns: int, scale: int = 1) -> Image.Image:
    w, h = images[0].size
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    if scale > 1:
        sheet = sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)
    return sheet


def _publish(tmp: Path, final: Path) -> Path:
    old = final.with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _fresh(final: Path) -> Path:
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def export_pipeline(pipe, final: Path | None, weights: Weights) -> Path | None:
    """A diffusers folder that `StableDiffusionPipeline.from_pretrained(final)` loads: the files
    `pipe.save_pretrained` writes, each model's weights taken from `weights` (`Session.weights`) a
    part at a time and written as they arrive (`core.checkpoint.stream`), so a pipeline whose weights
    live in chunks is exported without ever being whole in memory. Every rank calls it (the parts
    are gathered); only the one given `final` writes."""
    tmp = _fresh(Path(final)) if final is not None else None
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            _save_model(component, tmp / name if tmp else None, weights)
        elif component is not None and tmp is not None:
            component.save_pretrained(tmp / name)
    if tmp is None:
        return None
    pipe.save_config(tmp)          # model_index.json, as save_pretrained writes it last
    return _publish(tmp, Path(final))


def _save_model(model: torch.nn.Module, folder: Path | None, weights: Weights) -> None:
    """What the model's own `save_pretrained` writes (its config, its weights as one safetensors
    file), the weights taken from `weights(model)` part by part. Floating weights are written in
    fp32, as they are gathered."""
    from diffusers import ModelMixin

    specs = state_specs(model)
    if folder is None:
        write_parts(None, specs, weights(model))
        return
    folder.mkdir(parents=True)
    if isinstance(model, ModelMixin):
        model.save_config(folder)
        file = "diffusion_pytorch_model.safetensors"
    else:                                            # a transformers model (the text encoder)
        config = model.config
        config.dtype = "float32"
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
        file = "model.safetensors"
    write_parts(folder / file, specs, weights(model), metadata={"format": "pt"})


def export_lora(unet, final: Path, base_model: str | Path, adapters: dict[str, torch.Tensor]) -> Path:
    """`pytorch_lora_weights.safetensors` (diffusers' LoRA format) and the base model it adapts.
    `adapters`: the adapters' weights by parameter name (`Session.weights(unet, trained_only=True)`:
    where the weights live in chunks, the UNet's own tensors do not hold them)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    tmp = _fresh(Path(final))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=adapters))
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
    (tmp / "base_model.json").write_text(json.dumps({"pretrained": str(Path(base_model).resolve())}) + "\n")
    return _publish(tmp, Path(final))


def to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))
