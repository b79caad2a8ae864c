"""Does LAMB make a 16x larger batch pay? Steps to a target loss on the tiny GPT, in one process.

    python -m benchmarks.large_batch                  # from scratch, N = 144, B = 16 (a few minutes)
    python -m benchmarks.large_batch --past-plateau   # past the plateau, B = 1, N = 576 (about 5 minutes)
    python -m benchmarks.large_batch --quick          # a toy model and corpus, seconds (the test runs it)
    python -m benchmarks.large_batch --tune           # the small-batch learning-rate sweep (see below)
    python -m benchmarks.large_batch --noise-scale --steps 384   # the gradient noise scale along AdamW at B

1. AdamW at batch B (the tiny recipe's 16 sequences) for N steps sets the target: its final
   validation loss.
2. AdamW and LAMB at batch kB run until their validation loss reaches the target, or N/8 steps
   pass. k = 16 is the batch ratio of recipes/gpt/large-batch-lamb.yaml to recipes/gpt/tiny.yaml.
3. The effect to reproduce (You et al., arXiv:1904.00962): LAMB at 16B reaches the target within
   N/12 steps (1.33x the baseline's samples) and in fewer steps than AdamW at 16B.

Every run builds the tiny recipe's GPT from the same seed and draws the same data: the core
sampler's order depends only on the seed, so step j at batch 16B holds exactly the samples of
steps 16j ... 16j+15 at batch B. Each run uses its recipe's optimizer (`core.optim`'s factory:
AdamW with tiny.yaml's settings, LAMB with large-batch-lamb.yaml's), gradient clipping at 1.0
and the recipes' schedule shape (linear warm-up over the recipe's fraction of the run, then
cosine to 10%) over the run's length: N steps for the baseline, N/8 for the large batches.
The validation loss is the mean next-token loss on a fixed set of held-out windows (the first
`--val-windows` of the corpus's validation split); the baseline is evaluated every N/16 steps,
the large-batch runs after every step, so steps-to-target is exact.

Learning rates: the recipe's square-root rule, lr(16B) = sqrt(16) x lr(B), from each optimizer's
own base at batch B. Both bases were tuned the same way, on the small batch only: `--tune`, N = 144
steps at B = 16, on a half-decade grid (final validation loss; 1 CPU thread, torch 2.13):

    AdamW  lr 3e-4: 6.546   1e-3: 5.769   3e-3: 5.783 (tiny.yaml's)   1e-2: 6.371
    LAMB   lr 3e-3: 7.152   1e-2: 6.174   3e-2: 5.919                 1e-1: 6.541

so AdamW's base is 1e-3 (ADAMW_BASE_LR) and LAMB's 3e-2 (the recipe's 0.12 / 4); at 16B they
become 4e-3 and 0.12. Nothing was tuned at 16B.

What it measured (2 CPU cores, torch 2.13, one thread; nothing tuned at 16B). From scratch, as in
the tiny recipe, the effect is not reproduced:

    N=144, B=16:  target 5.769; at 256, 18 steps: AdamW best 6.663, LAMB 6.698
    N=288, B=16:  target 5.267; at 256, 36 steps: AdamW best 6.585, LAMB 6.521
    N=576, B=2 (--batch 2 --steps 576):  target 5.662; at 32, 72 steps: AdamW 6.376, LAMB 6.443
    (an earlier warm start, from the end of a 400-step cosine run and with fresh moments:
        target 4.943 from 5.080; at 256 both first jumped up, to 6.41 and 9.29, and ended at
        AdamW 5.111, LAMB 5.954)

Why, measured: `--noise-scale --steps 384` (AdamW at B = 16, the tiny recipe's run) prints the
gradient noise scale B_simple of McCandlish et al. (arXiv:1812.06162) from 128 random training
windows every 24 steps: 8-25 sequences on the plateau (steps 0-96, loss 8.3 -> 5.8), 26-53 over
steps 120-216 (5.6 -> 5.3), 60-170 after (5.2 -> 5.1). In their model the steps to a loss scale as
1 + B_noise / B, so 16x the batch divides the steps by at most (1 + Bn/B) / (1 + Bn/16B): at B = 16
that is 2.3 (Bn = 25), 3.4 (Bn = 50), 7.0 (Bn = 170), never the 12 the effect asks for, whatever
the optimizer. The from-scratch runs also sit on the plateau near 6.4-6.8 nats (predicting tokens
without their context) for dozens of steps, and leaving it takes steps, not samples.

Where the effect can exist: B far below the noise scale. Past the plateau (Bn 40-70) with B = 1,
16x the batch can divide the steps by 12-13. `--past-plateau`: every run starts from AdamW's weights
and moments after 150 steps at batch 16 (lr 1e-3, held: no decay), on data the warm-up did not
see; B = 1, N = 576; base lrs from `--tune` at B = 1 from that start (final loss, 576 steps):

    AdamW  lr 3e-5: 5.380   1e-4: 5.373   3e-4: 5.397   1e-3: 5.454
    LAMB   lr 3e-4: 5.370   1e-3: 5.356   3e-3: 5.397   1e-2: 5.467   3e-2: 5.717

so 1e-4 and 1e-3, and at 16 sequences 4e-4 and 4e-3. Steps to the target (limit 72, goal 48):

    seed 0 (--past-plateau):            target 5.373 (from 5.418): LAMB 13, AdamW 17
    seed 1 (--past-plateau --seed 1):   target 5.346 (from 5.402): LAMB 12, AdamW 14
    seed 2 (--past-plateau --seed 2):   target 5.361 (from 5.406): LAMB 10, AdamW 15

LAMB reaches the target within N/12 steps and before AdamW at every seed: the effect, in this
setting. What it does and does not say: the target is only 0.045-0.056 nats below the start,
because at B = 1 AdamW sits at its noise floor (with N = 1152 it ends at 5.380, no lower than
with 576); the batch of 16 gets there with fewer samples than the baseline (208 against 576), as
expected when the small batch is noise-bound. It is the regime the paper's claim needs (batch far
below the noise scale), reached on this model only at one sequence per step; the tiny recipe's
from-scratch run at B = 16 is not in it.

JSON lines (value None: the target was not reached within the limit):

    {"name": "large_batch_lamb_target", "value": target loss, "curve": [[step, loss], ...], ...}
    {"name": "large_batch_lamb_steps", "optimizer": "adamw" | "lamb", "value": steps or None, ...}
    {"name": "large_batch_lamb_summary", "lamb_steps", "adamw_steps", "limit", "goal",
     "lamb_within_goal", "lamb_beats_adamw", ...}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from apps.gpt.config import GPTRecipe
from apps.gpt.data import TokenWindows, prepare_corpus
from apps.gpt.model import GPT, next_token_loss
from apps.gpt.pretrain import resolve_vocab
from benchmarks._machine import machine
from core.config import OptimConfig, load_recipe
from core.data import GlobalBatchSampler
from core.distributed import Layout, ParallelMesh
from core.optim import LRShape, build_optimizer

BASE_RECIPE = "gpt/tiny"
LARGE_RECIPE = "gpt/large-batch-lamb"
# --quick: a toy GPT on 300 kB of the corpus as raw bytes (no BPE to train), so that a fresh
# machine runs it in seconds; the numbers mean nothing, the plumbing is all there.
QUICK_OVERRIDES = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.seq_len=32",
                   "data.tokenizer=bytes", "data.max_bytes=300000"]
QUICK = {"steps": 24, "batch": 4, "val_windows": 8}
# --past-plateau: the setting where a 16x batch can divide the steps by 12 (see the docstring): the
# runs start from AdamW's weights after 150 steps at batch 16 (past the plateau, where the noise
# scale is 40-70 sequences), and B is one sequence; the base lrs are the best of a sweep at B = 1.
PAST_PLATEAU = {"warm_start": 150, "warm_batch": 16, "warm_lr": 1e-3, "batch": 1, "steps": 576,
                "adamw_lr": 1e-4, "lamb_lr": 1e-3}
ADAMW_BASE_LR = 1e-3            # the best of the small-batch sweep above


@dataclass
class Setup:
    """What every run shares: the model's recipe, the data, the held-out set, the loop's settings."""

    cfg: GPTRecipe              # the base recipe, its vocabulary resolved
    train_set: TokenWindows
    val_batch: torch.Tensor     # (windows, seq_len + 1), fixed
    micro_batch: int
    init: dict | None = None    # --warm-start: the weights every measured run starts from
    skip: int = 0               # --warm-start: samples the warm-up run consumed (not seen again)
    moments: dict | None = None  # --warm-start: the warm-up's Adam moments by parameter name (step, m, v)


@dataclass
class Run:
    optim: OptimConfig
    batch: int                  # sequences per optimizer step
    steps: int                  # the schedule's length, and the most steps run
    warmup: int
    eval_every: int
    target: float | None = None  # stop at the first evaluation at or below this
    schedule: str | None = None  # the lr schedule's kind; None = the recipe's
    noise: bool = False         # also measure the gradient noise scale at every evaluation


@dataclass
class Result:
    curve: list[list]           # [[step, validation loss], ...], step 0 included
    reached: int | None         # the first step whose validation loss is <= the target
    diverged: bool
    seconds: float
    state: dict | None = None   # the final weights
    moments: dict | None = None  # the final Adam moments by parameter name: (step, exp_avg, exp_avg_sq)
    noise: list = dataclasses.field(default_factory=list)   # [[step, B_simple in sequences], ...]


def val_loss(model: GPT, s: Setup) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(next_token_loss(model, chunk).double() * len(chunk)
                    for chunk in s.val_batch.split(s.micro_batch))
    model.train()
    return float(total / len(s.val_batch))


NOISE_WINDOWS = 128             # training windows, drawn at random once, behind every noise-scale estimate


def noise_windows(s: Setup, n: int = NOISE_WINDOWS) -> torch.Tensor:
    """`n` training windows drawn at random (a fixed draw): independent samples, as the noise
    scale's estimators assume (neighbouring held-out windows share their text and would make the
    gradients look less noisy than a batch's are)."""
    pick = torch.randperm(len(s.train_set), generator=torch.Generator().manual_seed(12345))[:n]
    return torch.stack([s.train_set[int(i)] for i in pick])


def noise_scale(model: GPT, windows: torch.Tensor) -> float:
    """The simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al., "An
    Empirical Model of Large-Batch Training", arXiv:1812.06162), in sequences: the batch
    above which a larger batch stops dividing the steps needed (in their model, steps to a loss go
    as 1 + B_noise / B). From one gradient per window of `windows` (n of them), with their unbiased
    estimators: |G|^2 = (n |g_n|^2 - E|g_1|^2) / (n - 1) and tr(Sigma) = (E|g_1|^2 - |g_n|^2) / (1 - 1/n)."""
    params = [p for p in model.parameters() if p.requires_grad]
    single, total = 0.0, None
    for window in windows:
        model.zero_grad(set_to_none=True)
        next_token_loss(model, window[None]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).double()
        single += float(g.square().sum())
        total = g if total is None else total.add_(g)
    model.zero_grad(set_to_none=True)
    n = len(windows)
    single /= n
    whole = float((total / n).square().sum())
    g2 = (n * whole - single) / (n - 1)
    trace = (single - whole) / (1 - 1 / n)
    return trace / g2 if g2 > 0 else math.inf


def train(s: Setup, run: Run, desc: str) -> Result:
    """`run` from the recipe's initial weights, in a plain loop: the core trainer runs to a fixed
    step count, and this one stops as soon as the target is reached."""
    t0 = time.perf_counter()
    torch.manual_seed(s.cfg.train.seed)
    model = GPT(s.cfg.model)
    if s.init is not None:
        model.load_state_dict(s.init)
    optimizer = build_optimizer(run.optim, model)
    if s.moments is not None:
        carry_moments(optimizer, model, s.moments)
    shape = LRShape(total=run.steps, warmup=run.warmup, kind=run.schedule or s.cfg.train.lr_schedule,
                    min_ratio=s.cfg.train.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
    micro = min(s.micro_batch, run.batch)
    accum = run.batch // micro
    if micro * accum != run.batch:
        raise SystemExit(f"a batch of {run.batch} does not split into micro-batches of {micro}; "
                         f"use a multiple of {micro} (or fewer) for --batch")
    if s.skip % micro:
        raise SystemExit(f"the warm-up used {s.skip} samples, which micro-batches of {micro} do not divide")
    batches = iter(GlobalBatchSampler(len(s.train_set), micro, accum, 0, 1, seed=s.cfg.train.seed))
    for _ in range(s.skip // micro):
        next(batches)
    curve = [[0, val_loss(model, s)]]
    probe = noise_windows(s) if run.noise else None
    noise = [[0, noise_scale(model, probe)]] if run.noise else []
    reached, diverged = None, False
    model.train()
    bar = tqdm(range(1, run.steps + 1), desc=desc, unit="step", leave=False, file=sys.stderr)
    for step in bar:
        for _ in range(accum):
            batch = torch.stack([s.train_set[i] for i in next(batches)])
            (next_token_loss(model, batch) / accum).backward()
        if s.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % run.eval_every == 0 or step == run.steps:
            loss = val_loss(model, s)
            curve.append([step, loss])
            if run.noise:
                noise.append([step, noise_scale(model, probe)])
            bar.set_postfix_str(f"val {loss:.4f}", refresh=False)
            if not math.isfinite(loss):
                diverged = True
                break
            if run.target is not None and loss <= run.target:
                reached = step
                break
    bar.close()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Result(curve, reached, diverged, time.perf_counter() - t0, state, noise=noise,
                  moments=adam_moments(optimizer, model))


def adam_moments(optimizer: torch.optim.Optimizer, model: GPT) -> dict:
    """{name: (step, exp_avg, exp_avg_sq)} of every parameter the optimizer has stepped (AdamW and
    LAMB keep the same two moments under the same names)."""
    out = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p, {})
        if "exp_avg" in st:
            out[name] = (int(st["step"]), st["exp_avg"].clone(), st["exp_avg_sq"].clone())
    return out


def carry_moments(optimizer: torch.optim.Optimizer, model: GPT, moments: dict) -> None:
    """Start `optimizer` (AdamW or LAMB) from another run's moments, as resuming a checkpoint
    would: a fresh Adam's first steps move every weight by about lr whatever its gradient."""
    for name, p in model.named_parameters():
        if name in moments:
            step, m, v = moments[name]
            if isinstance(optimizer, torch.optim.AdamW):
                step = torch.tensor(float(step))       # torch's AdamW keeps its step as a tensor
            optimizer.state[p] = {"step": step, "exp_avg": m.clone(), "exp_avg_sq": v.clone()}


def warmup_steps(fraction: float, steps: int) -> int:
    """The recipe's warm-up fraction of a run of `steps` steps (at least 1 if it has one)."""
    return max(1, round(fraction * steps)) if fraction > 0 else 0


def setup(overrides: list[str], val_windows: int) -> tuple[Setup, GPTRecipe]:
    base = load_recipe(GPTRecipe, BASE_RECIPE, overrides)
    large = load_recipe(GPTRecipe, LARGE_RECIPE, overrides)
    corpus = prepare_corpus(base.data, ParallelMesh.build(Layout()).world,
                            log=lambda m: print(m, file=sys.stderr))
    base = dataclasses.replace(base, model=resolve_vocab(base.model, corpus.tokenizer.vocab_size))
    train_set = TokenWindows(corpus.train_tokens, base.model.seq_len, "training split")
    val_set = TokenWindows(corpus.val_tokens, base.model.seq_len, "validation split")
    if len(val_set) < val_windows:
        raise SystemExit(f"the validation split has {len(val_set)} windows; --val-windows asks for {val_windows}")
    val_batch = torch.stack([val_set[i] for i in range(val_windows)])
    return Setup(base, train_set, val_batch, base.train.micro_batch), large


def batch_of(cfg: GPTRecipe) -> int:
    """Sequences per optimizer step of a one-process run of `cfg`."""
    return cfg.train.global_batch or cfg.train.micro_batch * cfg.train.grad_accum


def tune(s: Setup, large: GPTRecipe, names: list[str], args, info: dict) -> None:
    """Optimizers at batch B for N steps, over a grid of learning rates (nothing at 16B)."""
    base_fraction = s.cfg.train.warmup_steps / s.cfg.train.steps
    for name, optim in (("adamw", s.cfg.optim), ("lamb", large.optim)):
        if name not in names:
            continue
        for lr in (args.lamb_lrs or args.lrs) if name == "lamb" else args.lrs:
            run = Run(dataclasses.replace(optim, lr=lr), args.batch, args.steps,
                      warmup_steps(base_fraction, args.steps), max(1, args.steps // 16))
            r = train(s, run, f"{name} lr {lr:g} at batch {args.batch}")
            print(json.dumps({"name": "large_batch_lamb_tune", "optimizer": name, "lr": lr,
                              "value": r.curve[-1][1], "unit": "nats/token", "baseline": None,
                              "batch": args.batch, "steps": args.steps, "curve": r.curve,
                              "seconds": r.seconds, "machine": info}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=144, help="N: the baseline's steps (a multiple of 24)")
    ap.add_argument("--batch", type=int, default=0, help="B: the baseline's batch; 0 = the tiny recipe's")
    ap.add_argument("--adamw-lr", type=float, default=ADAMW_BASE_LR, help="AdamW's base lr at batch B")
    ap.add_argument("--lamb-lr", type=float, default=0.0,
                    help="LAMB's base lr at batch B; 0 = the large-batch recipe's lr undone by its sqrt rule")
    ap.add_argument("--seed", type=int, default=None, help="train.seed of every run (the model's init and data order)")
    ap.add_argument("--val-windows", type=int, default=64, help="held-out windows in the validation loss")
    ap.add_argument("--quick", action="store_true", help="a toy model and corpus, N = 24, B = 4 (seconds)")
    ap.add_argument("--past-plateau", action="store_true",
                    help="warm start 150 steps at batch 16, then B = 1, N = 576 (where the effect can exist)")
    ap.add_argument("--tune", nargs="*", choices=("adamw", "lamb"), default=None,
                    help="only sweep --lrs at batch B for these optimizers (none named: both)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--lamb-lrs", type=float, nargs="+", default=None, help="LAMB's grid, if not --lrs")
    ap.add_argument("--warm-start", type=int, default=0, metavar="K",
                    help="first train AdamW for K steps (--warm-batch, --warm-lr; linear warm-up, then the lr held); "
                         "every measured run then starts from its weights and moments, on data it did not see")
    ap.add_argument("--noise-scale", action="store_true",
                    help="only run AdamW at batch B for N steps and print the gradient noise scale at every evaluation")
    ap.add_argument("--fresh-moments", action="store_true",
                    help="start the measured runs with fresh optimizer moments instead of the warm-up's")
    ap.add_argument("--warm-batch", type=int, default=0, help="the warm-up's batch; 0 = B")
    ap.add_argument("--warm-lr", type=float, default=0.0, help="the warm-up's AdamW lr; 0 = --adamw-lr")
    args = ap.parse_args(argv)
    for preset, values in ((args.quick, QUICK), (args.past_plateau, PAST_PLATEAU)):
        for key, value in values.items() if preset else ():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    if args.steps % 24:
        ap.error(f"--steps {args.steps}: must be a multiple of 24 (so that N/8 and N/12 are whole)")

    overrides = (QUICK_OVERRIDES if args.quick else []) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    s, large = setup(overrides, args.val_windows)
    k = batch_of(large) // batch_of(s.cfg)
    if k * batch_of(s.cfg) != batch_of(large):
        raise SystemExit(f"{LARGE_RECIPE}'s batch ({batch_of(large)}) is not a multiple of "
                         f"{BASE_RECIPE}'s ({batch_of(s.cfg)})")
    rule = math.sqrt(k)                                     # the recipe's square-root rule
    args.batch = args.batch or batch_of(s.cfg)
    adamw_base = args.adamw_lr
    lamb_base = args.lamb_lr or large.optim.lr / rule
    info = machine()
    base_fraction = s.cfg.train.warmup_steps / s.cfg.train.steps
    if args.warm_start:
        k_steps, wb = args.warm_start, args.warm_batch or args.batch
        warm = train(s, Run(dataclasses.replace(s.cfg.optim, lr=args.warm_lr or adamw_base), wb, k_steps,
                            warmup_steps(base_fraction, k_steps), max(1, k_steps // 8), schedule="constant"),
                     f"warm start: adamw at batch {wb}")
        s.init, s.skip = warm.state, k_steps * wb
        s.moments = None if args.fresh_moments else warm.moments
        print(json.dumps({"name": "large_batch_lamb_warm_start", "value": warm.curve[-1][1], "unit": "nats/token",
                          "baseline": None, "steps": k_steps, "batch": wb, "lr": args.warm_lr or adamw_base,
                          "curve": warm.curve, "seconds": warm.seconds, "machine": info}), flush=True)
    if args.noise_scale:
        run = Run(dataclasses.replace(s.cfg.optim, lr=adamw_base), args.batch, args.steps,
                  warmup_steps(base_fraction, args.steps), max(1, args.steps // 16), noise=True)
        r = train(s, run, f"adamw at batch {args.batch}, noise scale")
        print(json.dumps({"name": "large_batch_noise_scale", "value": r.noise[-1][1], "unit": "sequences",
                          "baseline": None, "batch": args.batch, "steps": args.steps, "lr": adamw_base,
                          "tokens_per_sequence": s.cfg.model.seq_len, "noise": r.noise, "curve": r.curve,
                          "seconds": r.seconds, "machine": info}), flush=True)
        return 0
    if args.tune is not None:
        tune(s, large, args.tune or ["adamw", "lamb"], args, info)
        return 0

    n, b = args.steps, args.batch
    limit, goal = n // 8, n // 12
    large_fraction = large.train.warmup_steps / large.train.steps
    tokens = s.cfg.model.seq_len
    base_run = Run(dataclasses.replace(s.cfg.optim, lr=adamw_base), b, n,
                   warmup_steps(base_fraction, n), max(1, n // 16))
    base = train(s, base_run, f"adamw at batch {b}")
    target = base.curve[-1][1]
    print(json.dumps({"name": "large_batch_lamb_target", "value": target, "unit": "nats/token",
                      "baseline": None, "optimizer": "adamw", "batch": b, "tokens_per_step": b * tokens,
                      "steps": n, "lr": adamw_base, "warmup": base_run.warmup, "curve": base.curve,
                      "diverged": base.diverged, "seconds": base.seconds, "machine": info}), flush=True)

    steps: dict[str, int | None] = {}
    for name, optim, base_lr in (("adamw", s.cfg.optim, adamw_base), ("lamb", large.optim, lamb_base)):
        run = Run(dataclasses.replace(optim, lr=base_lr * rule), k * b, limit,
                  warmup_steps(large_fraction, limit), 1, target)
        r = train(s, run, f"{name} at batch {k * b}")
        steps[name] = r.reached
        losses = [loss for _, loss in r.curve]
        print(json.dumps({"name": "large_batch_lamb_steps", "optimizer": name, "value": r.reached,
                          "unit": "steps", "baseline": f"adamw at batch {b} for {n} steps reaches the target",
                          "target": target, "reached": r.reached is not None, "batch": k * b,
                          "tokens_per_step": k * b * tokens, "lr": run.optim.lr, "base_lr": base_lr,
                          "lr_rule": f"sqrt: lr x sqrt({k})", "limit": limit, "goal": goal,
                          "warmup": run.warmup, "best_val_loss": min(losses), "curve": r.curve,
                          "diverged": r.diverged, "seconds": r.seconds, "machine": info}), flush=True)

    lamb, adamw = steps["lamb"], steps["adamw"]
    print(json.dumps({"name": "large_batch_lamb_summary", "value": lamb, "unit": "steps", "baseline": adamw,
                      "lamb_steps": lamb, "adamw_steps": adamw, "limit": limit, "goal": goal, "target": target,
                      "lamb_within_goal": lamb is not None and lamb <= goal,
                      "lamb_beats_adamw": lamb is not None and (adamw is None or lamb < adamw),
                      "steps": n, "batch": b, "large_batch": k * b, "machine": info}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
