"""A tiny Stable Diffusion built here, so the default runs with nothing downloaded.

Its parts are the real diffusers / transformers classes at a small size: a `UNet2DConditionModel`,
an `AutoencoderKL`, a `CLIPTextModel` and a `CLIPTokenizer` whose vocabulary this module writes.
A VAE with random weights would decode any latent to noise, so before the UNet is trained the
VAE gets a short reconstruction warm-up on the shapes images (a few hundred steps; the result is
cached), and its latent scaling factor is measured on them (1 / std of the latents, the way
Stable Diffusion's 0.18215 was chosen). The result is saved as an ordinary diffusers pipeline
folder, so every later step loads it like any Stable Diffusion checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from apps.diffusion.shapes import WORDS
from apps.diffusion.tokenizer import BOS, EOS, clip_vocab, write_clip_tokenizer

VERSION = 1
MAX_TOKENS = 16


def tiny_key(width: int, vae_steps: int, data_folder: Path, resolution: int, seed: int) -> str:
    text = json.dumps({"v": VERSION, "width": width, "vae_steps": vae_steps, "data": str(data_folder),
                       "resolution": resolution, "seed": seed})
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _images(folder: Path, resolution: int) -> torch.Tensor:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line]
    arrays = []
    for r in rows:
        with Image.open(folder / r["file_name"]) as im:
            im = im.convert("RGB")
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BICUBIC)
            arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def warm_up_vae(vae, images: torch.Tensor, steps: int, seed: int, batch: int = 32, lr: float = 5e-3) -> float:
    """Train the VAE to reconstruct `images`; returns the final reconstruction MSE (posterior mean)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for _ in tqdm(range(steps), desc="tiny VAE warm-up", unit="step", file=sys.stderr, mininterval=1.0):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        # Reconstruction, with a KL term small enough to leave the latents informative (as SD's VAE).
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    vae.eval()
    with torch.no_grad():
        x = images[:256]
        return float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x))


def tiny_modules(resolution: int, width: int, tokenizer=None):
    """The tiny model's text encoder, VAE and UNet, freshly initialised (on the current default
    device: the planner makes them on the meta device). `tokenizer`: the CLIP tokenizer of WORDS
    (its size and special tokens; without one they are computed from WORDS)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if tokenizer is None:
        vocab, _ = clip_vocab(WORDS)
        size, bos, eos = len(vocab), vocab[BOS], vocab[EOS]
    else:
        size, bos, eos = len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=bos,
        eos_token_id=eos, pad_token_id=eos if tokenizer is None else tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        sample_size=resolution, mid_block_add_attention=False)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, 2 * width), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    return text_encoder, vae, unet


def build_tiny(folder: Path, data_folder: Path, resolution: int, width: int, vae_steps: int, seed: int,
               log: Callable[[str], None]) -> Path:
    """Build, warm up and save the tiny pipeline into `folder` (atomically)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok_dir = write_clip_tokenizer(tmp / "_vocab", WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    text_encoder, vae, unet = tiny_modules(resolution, width, tokenizer)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, rescale_betas_zero_snr=True, prediction_type="v_prediction",
                              timestep_spacing="trailing", clip_sample=False, steps_offset=1)
    images = _images(data_folder, resolution)
    log(f"tiny Stable Diffusion: VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M, UNet "
        f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f} M parameters; warming up the VAE "
        f"on {len(images)} images for {vae_steps} steps (once; cached in {folder})")
    mse = warm_up_vae(vae, images, vae_steps, seed)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"VAE reconstruction MSE {mse:.4f} (images in [-1, 1]); latent scaling factor "
        f"{vae.config.scaling_factor:.4f}")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler.config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp)
    shutil.rmtree(tmp / "_vocab")
    (tmp / "loom_tiny.json").write_text(json.dumps({"vae_recon_mse": mse, "vae_steps": vae_steps,
                                                    "data": str(data_folder), "resolution": resolution}) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
