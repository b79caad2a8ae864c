"""What does strategy="loom" cost a Lightning user? The same LightningModule (an MLP of 4.2 M
parameters on generated data, AdamW, gradient clipping at 1.0) trained by Lightning's Trainer on 2
gloo ranks, started as torchrun starts them, under Lightning's own `ddp` strategy and under
`strategy="loom"` with no offload (Loom's DDP plugin: its model and optimizer wrappers, clipping over
the whole model, its checkpoint-ready optimizer step). Runs alternate (which goes first swaps each
repeat); each times its steps after a warm-up with a callback, and the median over repeats is
reported:

    {"name": "lightning_overhead_ratio", "value": loom_steps_per_s / ddp_steps_per_s, ...}

Usage: python -m benchmarks.lightning_overhead [--steps 60] [--skip 10] [--repeats 4]   (~3 minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks._machine import machine

WIDTH, DEPTH, BATCH = 1024, 4, 32


def _module():
    import pytorch_lightning as pl

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers = [torch.nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH)]
            self.net = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.GELU())])
            self.head = torch.nn.Linear(WIDTH, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.head(self.net(x)), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return MLP()


class _Clock:
    """Time stamps at the start of each training batch (Lightning's callback hook)."""

    def __new__(cls):
        import pytorch_lightning as pl

        class Clock(pl.Callback):
            def __init__(self) -> None:
                self.stamps: list[float] = []

            def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
                self.stamps.append(time.perf_counter())

        return Clock()


def rank(which: str, steps: int, skip: int) -> float:
    """One of 2 ranks: steps per second after `skip` steps, under `which` ("ddp" or "loom")."""
    import importlib

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    importlib.import_module("core.integrations.lightning")      # registers strategy="loom"

    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(BATCH * steps * 2, WIDTH, generator=g),
                                    torch.randint(0, 10, (BATCH * steps * 2,), generator=g)), batch_size=BATCH)
    clock = _Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=which, max_steps=steps, gradient_clip_val=1.0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(_module(), data)
    s = clock.stamps[skip:]
    return (len(s) - 1) / (s[-1] - s[0])


def main(argv: list[str] | None = None) -> int:
    from core.distributed.testing import run_distributed

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="first steps of each run left out of the timing")
    ap.add_argument("--repeats", type=int, default=4, help="pairs of runs, alternating which goes first")
    args = ap.parse_args(argv)
    if args.steps < args.skip + 3:
        ap.error("--steps must exceed --skip by at least 3")
    rates: dict[str, list[float]] = {"ddp": [], "loom": []}
    for r in range(args.repeats):
        for which in (("loom", "ddp") if r % 2 == 0 else ("ddp", "loom")):
            got = run_distributed(rank, world_size=2, args=(which, args.steps, args.skip), timeout=600)
            rates[which].append(min(got))           # the slower rank sets the pace
        print(f"repeat {r + 1}: loom {rates['loom'][-1]:.2f} steps/s, ddp {rates['ddp'][-1]:.2f} steps/s",
              file=sys.stderr)
    info = machine()
    loom, ddp = statistics.median(rates["loom"]), statistics.median(rates["ddp"])
    for name, value in (("lightning_loom_steps_per_s", loom), ("lightning_ddp_steps_per_s", ddp)):
        print(json.dumps({"name": name, "value": value, "unit": "steps/s", "baseline": None, "machine": info}))
    print(json.dumps({"name": "lightning_overhead_ratio", "value": loom / ddp, "unit": "x",
                      "baseline": "Lightning's own ddp strategy, same module, data and Trainer, 2 gloo ranks",
                      "target": 0.95, "repeats": rates,
                      "pair_ratios": [a / b for a, b in zip(rates["loom"], rates["ddp"])],
                      "timed_steps_per_run": args.steps - args.skip - 1, "machine": info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
