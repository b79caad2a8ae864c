"""An exponential moving average of a model's trainable weights.

The decay warms up as (1 + n) / (10 + n) up to its maximum, the schedule of diffusers'
`EMAModel`, so early averages are not dominated by the random initial weights. The averaged
weights can be swapped into the model for evaluation and swapped back. With chunked parameters
the session gives `core.zero.ema.ChunkEMA` instead (the same methods; `Session.average`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        self.model = model
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone() for n, p in self._params()}

    def _params(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in self._params():
            self.shadow[n].lerp_(p.detach().to(self.shadow[n].dtype), 1.0 - d)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for the duration of the block."""
        saved = {n: p.detach().clone() for n, p in self._params()}
        self.copy_to(self.model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self._params():
                    p.copy_(saved[n])

    def use_average(self) -> None:
        """Make the averages the model's weights (at the end of training, before an export)."""
        self.copy_to(self.model)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, v in self.shadow.items():
            params[n].copy_(v)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)
