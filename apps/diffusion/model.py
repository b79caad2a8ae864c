"""Stable Diffusion's parts, what is trained of them, and the denoising loss.

The parts come from a local diffusers folder (`model_index.json` with `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`), loaded with each class's own `from_pretrained`.
`Denoiser` is the module the Booster trains: the UNet, plus the text encoder (frozen unless
`finetune.train_text_encoder`). The VAE stays outside it, frozen: `DenoisingLoss` encodes images
to latents, noises them at random timesteps and scores the UNet's prediction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import named
from apps.diffusion.config import FinetuneConfig
from apps.diffusion.tokenizer import check_tokenizer
from core.errors import LoomError

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Parts:
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    unet: nn.Module
    scheduler: object            # the training noise schedule (DDPMScheduler)
    folder: Path


# what each part's folder needs: its config, and (for the three networks) weights
_CONFIGS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
            "scheduler": "scheduler_config.json"}
_WEIGHTS = ("unet", "vae", "text_encoder")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def check_pipeline_folder(path: str | Path, what: str = "model.pretrained",
                          fix: str = "give a local diffusers Stable Diffusion folder, or 'tiny'",
                          subject: str = "") -> Path:
    """Check, without loading anything, that `path` is a complete diffusers Stable Diffusion
    folder. Errors begin with `subject`, by default the recipe key or command-line flag `what`
    with the path; `fix` says what to do about a path that is not a folder."""
    folder = Path(path).expanduser()
    subject = subject or named(what, path)
    layout = f"{', '.join(p + '/' for p in PARTS)} as StableDiffusionPipeline.save_pretrained writes"
    if not folder.is_dir():
        problem = "does not exist" if not folder.exists() else "is not a folder"
        raise LoomError(f"{subject} {problem}; {fix}")
    if not (folder / "model_index.json").is_file():
        raise LoomError(f"{subject} is not a diffusers pipeline folder (no model_index.json); it needs {layout}")
    missing = [p for p in PARTS if not (folder / p).is_dir()]
    if missing:
        raise LoomError(f"{subject} lacks {', '.join(m + '/' for m in missing)}; a Stable Diffusion folder has "
                        f"{', '.join(p + '/' for p in PARTS)}")
    configs = [folder / "model_index.json"] + [folder / part / name for part, name in _CONFIGS.items()]
    for config in configs:
        rel = config.relative_to(folder)
        if not config.is_file():
            raise LoomError(f"{subject} lacks {rel}; it needs {layout}")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:
            raise LoomError(f"{subject} has a damaged {rel} (not JSON: {e}); restore it from the model's source") from None
    tok = folder / "tokenizer"
    if not (tok / "tokenizer.json").is_file() and not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file()):
        raise LoomError(f"{subject} has neither tokenizer/tokenizer.json nor tokenizer/vocab.json with merges.txt; "
                        f"restore them from the model's source")
    for part in _WEIGHTS:
        weights = sorted(f for f in (folder / part).iterdir() if f.suffix in _WEIGHT_SUFFIXES and f.is_file())
        if not weights:
            raise LoomError(f"{subject} has no weights in {part}/ (*.safetensors or *.bin); restore them from "
                            f"the model's source")
        for f in weights:
            check_weights_file(f, subject, folder)
    return folder


def check_weights_file(f: Path, subject: str, folder: Path) -> None:
    """A weights file that is a Git LFS pointer, or a truncated safetensors file (its header
    says how long it must be), is refused without reading the tensors."""
    from safetensors import SafetensorError, safe_open

    rel = f.relative_to(folder)
    if f.stat().st_size < 1024 and f.read_bytes().startswith(b"version https://git-lfs"):
        raise LoomError(f"{subject} has a Git LFS pointer in place of {rel}; run `git lfs pull` in {folder}")
    if f.suffix == ".safetensors":
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise LoomError(f"{subject} has a damaged {rel} ({e}); replace it with an intact copy") from None
    return folder


def load_parts(path: str | Path, unet_init: str = "pretrained", seed: int = 0) -> Parts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = check_pipeline_folder(path)
    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    except (OSError, ValueError, EnvironmentError) as e:
        raise LoomError(f"model.pretrained: cannot load {folder}: {str(e).splitlines()[0]}") from None
    check_tokenizer(tokenizer, folder / "tokenizer")
    if unet_init == "random":
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet.config)
    return Parts(vae, text_encoder, tokenizer, unet, scheduler, folder)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


class Denoiser(nn.Module):
    """The trained part: text encoder (frozen unless asked) and UNet, run as one forward so
    that data parallelism sees every trainable weight in it."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, train_text_encoder: bool) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.train_text_encoder = train_text_encoder
        text_encoder.requires_grad_(train_text_encoder)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(input_ids)[0]

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, self.encode_text(input_ids)).sample


def add_lora(unet: nn.Module, rank: int, alpha: float) -> None:
    """Freeze the UNet and give its attention projections LoRA adapters (the only trained weights)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))


class DenoisingLoss:
    """(model, batch) -> loss: the training objective of Stable Diffusion.

    Images are encoded by the frozen VAE (a sample of the latent distribution, times the VAE's
    scaling factor), noised at uniform timesteps (with optional offset noise), and the model
    predicts the noise or the velocity, as the scheduler's prediction type says. Optional min-SNR
    weighting (Hang et al. 2023) and DreamBooth's prior-preservation term. Every random draw of a
    sample comes from that sample's own seed (set by the dataset from seed, index and epoch).
    """

    def __init__(self, vae: nn.Module, scheduler, cfg: FinetuneConfig, prediction_type: str = "") -> None:
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler = scheduler
        self.cfg = cfg
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise LoomError(f"prediction type {self.prediction_type!r} is not supported; use epsilon or v_prediction")
        self.scaling = float(vae.config.scaling_factor)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        self._alphas = scheduler.alphas_cumprod

    def _draws(self, seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device):
        """Per-sample latent noise, diffusion noise, offset and timestep, each from the sample's
        own seed: the same draws whatever the batch it lands in (resume, data parallelism)."""
        eps, noise, offset, steps = [], [], [], []
        for s in seeds.tolist():
            g = torch.Generator(device=device).manual_seed(int(s))
            eps.append(torch.randn(shape, generator=g, device=device))
            noise.append(torch.randn(shape, generator=g, device=device))
            offset.append(torch.randn((shape[0], 1, 1), generator=g, device=device))
            steps.append(torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=g,
                                       device=device))
        return torch.stack(eps), torch.stack(noise), torch.stack(offset), torch.cat(steps)

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(pixels.to(next(self.vae.parameters()).dtype)).latent_dist
        return (dist.mean + dist.std * eps.to(dist.mean.dtype)).float() * self.scaling

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        pixels, ids, seeds = batch["pixel_values"], batch["input_ids"], batch["seed"]
        prior = "class_pixel_values" in batch
        if prior:
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            ids = torch.cat([ids, batch["class_input_ids"]])
            seeds = torch.cat([seeds, batch["class_seed"]])
        f = self.vae_scale
        shape = (self.latent_channels, pixels.shape[-2] // f, pixels.shape[-1] // f)
        eps, noise, offset, t = self._draws(seeds, shape, pixels.device)
        latents = self.latents(pixels, eps)
        if self.cfg.noise_offset:
            noise = noise + self.cfg.noise_offset * offset
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(latents, noise, t)
        pred = model(noisy, t, ids).float()
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.snr_gamma:
            alphas = self._alphas.to(latents.device)[t]
            snr = alphas / (1 - alphas)
            weight = torch.clamp(snr, max=self.cfg.snr_gamma)
            # min(SNR, gamma) / SNR for noise prediction, / (SNR + 1) for velocity (Hang et al. 2023)
            per_sample = per_sample * weight / (snr.clamp(min=1e-8) if self.prediction_type == "epsilon" else snr + 1)
        if prior:
            instance, klass = per_sample.chunk(2)
            return instance.mean() + self.cfg.prior_loss_weight * klass.mean()
        return per_sample.mean()
