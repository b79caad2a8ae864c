"""Stable Diffusion training, fine-tuning (full, LoRA, DreamBooth) and sampling on diffusers models."""

import os

# Never reach for a model hub: every model comes from a local folder (a hub id would otherwise
# retry with back-off for minutes before failing).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' config dumps and shard progress bars out of the console."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
