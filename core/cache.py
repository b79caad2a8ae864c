"""Where generated data, tokenized corpora and locally built models are cached."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str = "") -> Path:
    """`override` if given, else $LOOM_CACHE, else $XDG_CACHE_HOME/loom (~/.cache/loom)."""
    if override:
        return Path(override).expanduser()
    base = os.environ.get("LOOM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loom")
    return Path(base)
