"""Mixed precision: autocast for bf16/fp16 compute over fp32 weights, and fp16's loss scaler.

fp32 keeps everything in fp32. bf16 runs matmuls and convolutions in bfloat16 under
`torch.autocast` while the weights, gradients and optimizer states stay fp32 (bf16 has fp32's
range, so no loss scaling is needed). fp16 does the same in float16 and adds a dynamic loss
scaler: the loss is multiplied before backward, gradients are unscaled before clipping, and a
step whose gradients overflow is skipped and the scale lowered.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from core.errors import LoomError

# the dtype matmuls and convolutions compute in (and chunked parameters are held in on the device)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, name: str, device: torch.device) -> None:
        if name not in DTYPES:
            raise LoomError(f"parallel.precision: got {name!r}; allowed: {', '.join(DTYPES)}")
        self.name = name
        self.device = torch.device(device)
        self.dtype = DTYPES[name]

    def autocast(self) -> ContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def make_scaler(self) -> "torch.amp.GradScaler | None":
        if self.name != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def __repr__(self) -> str:
        return f"Precision({self.name})"


class LossScaler:
    """Dynamic loss scaling for fp16 where torch's GradScaler cannot reach the gradients (they
    live in chunks, not in `.grad`): the caller multiplies the loss by `scale`, divides the
    gradients by it, and reports overflow; an overflowing step is skipped and the scale halved,
    and it doubles again after `growth_interval` good steps."""

    def __init__(self, enabled: bool, init_scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
