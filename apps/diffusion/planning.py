"""What the auto-parallel planner needs of the diffusion app: its recipe and one training step of
its models, profiled on the meta device (`python -m core.plan --recipe diffusion/...`,
`parallel.auto=true`).

The step is the app's (`DenoisingLoss`): the frozen VAE encodes the images without gradients, the
text encoder (frozen unless `finetune.train_text_encoder`) encodes the captions, the UNet predicts
the noise. The profile's unit is one training sample (a DreamBooth sample with prior preservation
is two images: its own and a class image). What is trained follows the method: the whole UNet
(full, DreamBooth), or only the LoRA adapters, so the frozen weights get no gradients, no optimizer
states and no gradient traffic. The UNet's own activation checkpointing
(`model.gradient_checkpointing`) is measured by running its checkpointed blocks through
`core.autoparallel.profile.Segments`.

The models are made from their configurations alone: the tiny model from its code, a real one from
the `config.json` files of `model.pretrained` (its weights are only checked to be there, not read).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from apps.diffusion.checks import AXES
from apps.diffusion.config import DiffusionRecipe
from core.autoparallel.profile import ModelProfile, Segments, profile_layers
from core.autoparallel.target import AppTarget
from core.errors import LoomError
from core.pipeline.engine import PipelineLayer


def _modules(cfg: DiffusionRecipe) -> tuple[nn.Module, nn.Module, nn.Module, int]:
    """(text encoder, VAE, UNet, caption tokens) on the current default device."""
    if cfg.model.pretrained == "tiny":
        from apps.diffusion.tiny import MAX_TOKENS, tiny_modules

        return (*tiny_modules(cfg.data.resolution, cfg.model.tiny_width), MAX_TOKENS)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from apps.diffusion.model import check_pipeline_folder

    folder = check_pipeline_folder(cfg.model.pretrained)
    try:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(Path(folder) / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(Path(folder) / "vae")))
        text = CLIPTextConfig.from_pretrained(str(Path(folder) / "text_encoder"))
    except (OSError, ValueError) as e:
        raise LoomError(f"model.pretrained: cannot read the configurations in {folder}: "
                        f"{str(e).splitlines()[0]}") from None
    return CLIPTextModel(text), vae, unet, int(text.max_position_embeddings)


class _Step(nn.Module):
    """One training sample's step as pipeline layers: the VAE's encoding, the text encoder, the UNet."""

    def __init__(self, text_encoder: nn.Module, vae: nn.Module, unet: nn.Module, images: int, tokens: int,
                 resolution: int, train_text: bool) -> None:
        super().__init__()
        self.text_encoder, self.vae, self.unet = text_encoder, vae, unet
        self.train_text = train_text
        self.pixels = torch.zeros(images, 3, resolution, resolution)
        self.ids = torch.zeros(images, tokens, dtype=torch.long)
        self.t = torch.zeros(images, dtype=torch.long)

    def _encode(self, _) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(self.pixels).latent_dist.mean

    def _text(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.train_text):
            return latents, self.text_encoder(self.ids)[0]

    def _denoise(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        latents, states = pair
        return self.unet(latents, self.t, states).sample

    def pipeline_layers(self) -> list[PipelineLayer]:
        return [PipelineLayer("vae", ("vae",), self._encode, body=False),
                PipelineLayer("text_encoder", ("text_encoder",), self._text, body=False),
                PipelineLayer("unet", ("unet",), self._denoise, body=False)]


def profile(cfg: DiffusionRecipe) -> ModelProfile:
    from apps.diffusion.model import add_lora

    ft = cfg.finetune
    lora = ft.method == "lora" or (ft.method == "dreambooth" and ft.dreambooth_lora)
    prior = ft.method == "dreambooth" and ft.prior_loss_weight > 0
    with torch.device("meta"):
        text_encoder, vae, unet, tokens = _modules(cfg)
        if lora:
            add_lora(unet, ft.lora_rank, ft.lora_alpha)
        vae.requires_grad_(False)
        train_text = ft.train_text_encoder and not lora
        text_encoder.requires_grad_(train_text)
        step = _Step(text_encoder, vae, unet, 2 if prior else 1, tokens, cfg.data.resolution, train_text)
        sample = torch.zeros(1, 1)
    segments = Segments()
    unet.enable_gradient_checkpointing(segments.run)
    width = int(unet.config.block_out_channels[0])
    heads = unet.config.attention_head_dim
    heads = int(heads[0] if isinstance(heads, (list, tuple)) else heads)
    return profile_layers(step, sample, lambda pred: F.mse_loss(pred, torch.zeros_like(pred)), hidden=width,
                          heads=heads, segments=segments, unit="samples")


def max_zero(cfg: DiffusionRecipe) -> int:
    """Validation renders on rank 0 alone, which ZeRO-3 over several ranks cannot serve
    (`finetune._check_layout_allows`)."""
    return 2 if cfg.validation.prompts else 3


TARGET = AppTarget("diffusion", DiffusionRecipe, "diffusion/tiny-shapes", profile, axes=AXES,
                   max_zero_for=max_zero)
