"""Does Loom's trainer cost anything? The same tiny GPT, trained by Loom's `Trainer` and by a
hand-written minimal PyTorch loop, in the same process.

Both do the same work per step: one micro-batch of the tiny recipe's shape, forward,
cross-entropy, backward, gradient clipping at 1.0, AdamW with decay on matrices only, a cosine
schedule with warm-up. Loom adds what a user gets: the sampler, the progress bar, metrics
every 10 steps, the Booster's wrappers.

Throughput is timed from the start of one step's forward to the start of the next (the loss
function is the stamp in both loops), over all steps of a run but its first few: every
per-step cost counts (data, logging every 10 steps, the progress bar), while one-off costs
(building the optimizer, the final checkpoint and plot) do not. After one untimed warm-up
of each, runs alternate Loom / plain (swapping which goes first) and the median of the
repeats is reported. Prints JSON lines:

    {"name": "loop_throughput_ratio", "value": loom_tokens_per_s / plain_tokens_per_s, ...}

Usage: python -m benchmarks.gpt_loop_overhead [--steps 50] [--skip 5] [--repeats 8]   (~4 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import statistics
import sys
import tempfile
import time

import torch

from apps.gpt.config import GPTRecipe
from apps.gpt.data import TokenWindows, prepare_corpus
from apps.gpt.model import GPT, next_token_loss
from apps.gpt.pretrain import resolve_vocab
from benchmarks._machine import machine
from core.config import load_recipe
from core.distributed import Layout, ParallelMesh
from core.optim import LRShape, param_groups
from core.trainer import Trainer, TrainTask


class StepClock:
    """Time stamps taken as each step's forward starts; the loss function is the hook point in
    both loops, so the interval between two stamps is one whole step: data, forward, backward,
    clipping, optimizer, schedule, logging, progress bar. `loss_fn(model, batch)`: the loss it stamps
    (next-token cross-entropy on the model's logits by default)."""

    def __init__(self, loss_fn=next_token_loss) -> None:
        self.stamps: list[float] = []
        self.loss_fn = loss_fn

    def loss(self, model, batch):
        self.stamps.append(time.perf_counter())
        return self.loss_fn(model, batch)

    def seconds_per_step(self, skip: int) -> float:
        s = self.stamps[skip:]
        return (s[-1] - s[0]) / (len(s) - 1)


def loom_run(cfg: GPTRecipe, data: TokenWindows, steps: int, out: str) -> StepClock:
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    clock = StepClock()
    task = TrainTask(model=model, loss_fn=clock.loss, train_data=data,
                     units_per_sample=cfg.model.seq_len, unit="tokens")
    with contextlib.redirect_stderr(io.StringIO()):
        Trainer(_with(cfg, steps, out), ParallelMesh.build(Layout()), task).fit()
    return clock


def plain_run(cfg: GPTRecipe, data: TokenWindows, steps: int, make_model=None, loss_fn=next_token_loss) -> StepClock:
    """The hand-written loop: `make_model()` (Loom's GPT by default) trained with `loss_fn(model, batch)`."""
    torch.manual_seed(cfg.train.seed)
    model = make_model() if make_model is not None else GPT(cfg.model)
    clock = StepClock(loss_fn)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    shape = LRShape(total=steps, warmup=cfg.train.warmup_steps, kind=cfg.train.lr_schedule,
                    min_ratio=cfg.train.min_lr_ratio)
    g = torch.Generator().manual_seed(0)
    b = cfg.train.micro_batch
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * shape(step)
        idx = torch.randint(len(data), (b,), generator=g).tolist()
        batch = torch.stack([data[i] for i in idx])
        loss = clock.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            loss.item()
    return clock


def _with(cfg: GPTRecipe, steps: int, out: str) -> GPTRecipe:
    train = dataclasses.replace(cfg.train, steps=steps, eval_every=0, checkpoint_every=0)
    output = dataclasses.replace(cfg.output, dir=out, overwrite=True)
    return dataclasses.replace(cfg, train=train, output=output)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="steps per run")
    ap.add_argument("--skip", type=int, default=5, help="first steps of each run left out of the timing")
    ap.add_argument("--repeats", type=int, default=8, help="pairs of runs, alternating which goes first")
    ap.add_argument("--recipe", default="gpt/tiny")
    args = ap.parse_args(argv)
    if args.steps < args.skip + 3:
        ap.error("--steps must exceed --skip by at least 3")

    cfg = load_recipe(GPTRecipe, args.recipe, ["data.max_bytes=2000000", "data.val_fraction=0",
                                               "sample.tokens=0"])
    mesh = ParallelMesh.build(Layout())
    corpus = prepare_corpus(cfg.data, mesh.world, log=lambda m: print(m, file=sys.stderr))
    cfg = dataclasses.replace(cfg, model=resolve_vocab(cfg.model, corpus.tokenizer.vocab_size))
    data = TokenWindows(corpus.train_tokens, cfg.model.seq_len)
    tokens_per_step = cfg.train.micro_batch * cfg.model.seq_len

    loom, plain = [], []
    with tempfile.TemporaryDirectory() as out:
        # Untimed: the first run in a process pays for lazy initialisation (allocator, kernels).
        loom_run(cfg, data, 5, out)
        plain_run(cfg, data, 5)
        for r in range(args.repeats):
            # alternate the order, so drift of the machine does not favour one side
            order = ("loom", "plain") if r % 2 == 0 else ("plain", "loom")
            for which in order:
                if which == "loom":
                    sec = loom_run(cfg, data, args.steps, out).seconds_per_step(args.skip)
                    loom.append(tokens_per_step / sec)
                else:
                    sec = plain_run(cfg, data, args.steps).seconds_per_step(args.skip)
                    plain.append(tokens_per_step / sec)
            print(f"repeat {r + 1}: loom {loom[-1]:,.0f} tokens/s, plain {plain[-1]:,.0f} tokens/s",
                  file=sys.stderr)
    info = machine()
    loom_rate, plain_rate = statistics.median(loom), statistics.median(plain)
    print(json.dumps({"name": "loom_tokens_per_s", "value": loom_rate, "unit": "tokens/s",
                      "baseline": None, "machine": info}))
    print(json.dumps({"name": "plain_tokens_per_s", "value": plain_rate, "unit": "tokens/s",
                      "baseline": None, "machine": info}))
    print(json.dumps({"name": "loop_throughput_ratio", "value": loom_rate / plain_rate, "unit": "x",
                      "baseline": "hand-written PyTorch loop, same model and step", "target": 0.97,
                      "repeats": {"loom": loom, "plain": plain},
                      "pair_ratios": [a / b for a, b in zip(loom, plain)], "timed_steps_per_run": args.steps - args.skip - 1,
                      "machine": info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
