"""What does Loom's plan cost a Hugging Face model? The same GPT-2 (transformers'
GPT2LMHeadModel, random weights made here and saved as a local folder), trained in the same
process two ways:

- Loom: the GPT app's own path for `model.hf` (`apps.gpt.pretrain.model_factory`: the GPT-2 plan
  swaps in core.tensor's layers at tp=1 and runs the model as its sequence of layers), the app's
  loss (`HFCausalLM.loss`), Loom's `Trainer` with its sampler, progress bar and metrics;
- plain: the unmodified GPT2LMHeadModel from the same folder in a hand-written PyTorch loop,
  cross-entropy on its logits.

Both do the same step: one micro-batch of the tiny recipe's shape (16 x 128 tokens; GPT-2 with
4 layers x 128, 4 heads, the tiny recipe's vocabulary), forward, backward, clipping at 1.0, AdamW
with a cosine schedule. Throughput is timed from one step's forward to the next
(`gpt_loop_overhead.StepClock`), runs alternate and the median of the repeats is reported:

    {"name": "hf_plan_throughput_ratio", "value": loom_tokens_per_s / plain_tokens_per_s, ...}

Usage: python -m benchmarks.hf_plan_overhead [--steps 40] [--skip 5] [--repeats 6]   (~4 minutes)
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
from pathlib import Path

import torch
import torch.nn.functional as F

from apps.gpt.config import GPTRecipe
from apps.gpt.data import TokenWindows, prepare_corpus
from apps.gpt.model import next_token_loss
from apps.gpt.pretrain import model_factory
from benchmarks._machine import machine
from benchmarks import gpt_loop_overhead as loop_overhead
from benchmarks.gpt_loop_overhead import StepClock, _with
from core.config import load_recipe
from core.distributed import Layout, ParallelMesh
from core.memory.recompute import Recompute
from core.session import ModelParallel
from core.tensor import OneD
from core.trainer import Trainer, TrainTask


def make_folder(cfg: GPTRecipe, vocab: int, where: Path) -> Path:
    """GPT-2 of the tiny recipe's shape with random weights, saved by transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    config = GPT2Config(n_layer=m.n_layer, n_embd=m.d_model, n_head=m.n_head, n_positions=m.seq_len,
                        vocab_size=-(-vocab // 64) * 64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(where)
    return where


def loom_run(cfg: GPTRecipe, vocab: int, data: TokenWindows, steps: int, out: str) -> StepClock:
    torch.manual_seed(cfg.train.seed)
    model = model_factory(cfg, vocab)(ModelParallel(OneD.serial(), None, Recompute()))
    # the app's loss: next_token_loss through the model's own (vocabulary-parallel) loss
    clock = StepClock(lambda runner, batch: next_token_loss(runner, batch, model))
    task = TrainTask(model=model, loss_fn=clock.loss, train_data=data, units_per_sample=cfg.model.seq_len,
                     unit="tokens")
    with contextlib.redirect_stderr(io.StringIO()):
        Trainer(_with(cfg, steps, out), ParallelMesh.build(Layout()), task).fit()
    return clock


def plain_run(cfg: GPTRecipe, folder: Path, data: TokenWindows, steps: int) -> StepClock:
    """The unmodified GPT2LMHeadModel in `gpt_loop_overhead`'s hand-written loop, cross-entropy on
    its logits."""
    from transformers import GPT2LMHeadModel

    def make_model():
        with contextlib.redirect_stderr(io.StringIO()):
            return GPT2LMHeadModel.from_pretrained(folder)

    def loss_fn(model, batch):
        logits = model(batch[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    return loop_overhead.plain_run(cfg, data, steps, make_model, loss_fn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="steps per run")
    ap.add_argument("--skip", type=int, default=5, help="first steps of each run left out of the timing")
    ap.add_argument("--repeats", type=int, default=6, help="pairs of runs, alternating which goes first")
    args = ap.parse_args(argv)
    if args.steps < args.skip + 3:
        ap.error("--steps must exceed --skip by at least 3")

    cfg = load_recipe(GPTRecipe, "gpt/tiny", ["data.max_bytes=2000000", "data.val_fraction=0", "sample.tokens=0"])
    corpus = prepare_corpus(cfg.data, ParallelMesh.build(Layout()).world, log=lambda m: print(m, file=sys.stderr))
    vocab = corpus.tokenizer.vocab_size
    data = TokenWindows(corpus.train_tokens, cfg.model.seq_len)
    tokens_per_step = cfg.train.micro_batch * cfg.model.seq_len

    loom, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(cfg, vocab, Path(tmp) / "gpt2")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf=str(folder)))
        out = str(Path(tmp) / "run")
        loom_run(cfg, vocab, data, 5, out)          # untimed: lazy initialisation of both
        plain_run(cfg, folder, data, 5)
        for r in range(args.repeats):
            order = ("loom", "plain") if r % 2 == 0 else ("plain", "loom")
            for which in order:
                if which == "loom":
                    clock = loom_run(cfg, vocab, data, args.steps, out)
                    loom.append(tokens_per_step / clock.seconds_per_step(args.skip))
                else:
                    clock = plain_run(cfg, folder, data, args.steps)
                    plain.append(tokens_per_step / clock.seconds_per_step(args.skip))
            print(f"repeat {r + 1}: loom {loom[-1]:,.0f} tokens/s, plain {plain[-1]:,.0f} tokens/s", file=sys.stderr)
    info = machine()
    loom_rate, plain_rate = statistics.median(loom), statistics.median(plain)
    for name, value in (("hf_loom_tokens_per_s", loom_rate), ("hf_plain_tokens_per_s", plain_rate)):
        print(json.dumps({"name": name, "value": value, "unit": "tokens/s", "baseline": None, "machine": info}))
    print(json.dumps({"name": "hf_plan_throughput_ratio", "value": loom_rate / plain_rate, "unit": "x",
                      "baseline": "transformers' GPT2LMHeadModel in a hand-written PyTorch loop, same folder and step",
                      "target": 0.97, "repeats": {"loom": loom, "plain": plain},
                      "pair_ratios": [a / b for a, b in zip(loom, plain)],
                      "timed_steps_per_run": args.steps - args.skip - 1, "machine": info}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
