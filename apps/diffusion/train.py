"""Train a Stable Diffusion UNet from scratch: `python -m apps.diffusion.train [--recipe NAME] [key=value ...]`.

The same run as `apps.diffusion.finetune` with `model.unet_init=random` and `finetune.method=full`:
the VAE, text encoder and tokenizer come from `model.pretrained`, the UNet starts from random
weights of the same shape and learns the whole of the data set.
"""

from __future__ import annotations

import sys

from apps.diffusion import finetune
from core import cli


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return finetune.main(args, defaults=("model.unet_init=random", "finetune.method=full"))


def console() -> None:
    """The installed command `loom-diffusion-train`: `main` with Loom's exit statuses (`core.cli.run_main`)."""
    cli.run_main(main)


if __name__ == "__main__":
    console()
