"""GPT pretraining: `python -m apps.gpt.pretrain [--recipe NAME] [key=value ...]`.

With no arguments it runs `recipes/gpt/tiny.yaml`: a small GPT on the Python standard
library's source, in about two minutes on two CPU cores. Under torchrun it trains with data
parallelism: `torchrun --nproc-per-node 2 -m apps.gpt.pretrain parallel.dp=2`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from apps.gpt import hf
from apps.gpt.config import GPTModelConfig, GPTRecipe
from apps.gpt.data import Corpus, TokenWindows, prepare_corpus
from apps.gpt.model import GPT, next_token_loss
from apps.gpt.planning import TARGET
from core import cli
from core.autoparallel.auto import plan_recipe
from core.distributed import detect
from core.session import session
from core.trainer import TrainTask

SUMMARY = ("GPT pretraining on a folder of text files or, by default, the Python standard "
           "library's own source.")


def resolve_vocab(model: GPTModelConfig, tokenizer_vocab: int) -> GPTModelConfig:
    """model.vocab_size=0 becomes the tokenizer's vocabulary rounded up to a multiple of 64."""
    if model.vocab_size:
        return model
    return dataclasses.replace(model, vocab_size=-(-tokenizer_vocab // 64) * 64)


def sample_text(model: GPT, corpus_tokenizer, prompt: str, tokens: int, temperature: float,
                top_k: int, seed: int, device: torch.device) -> str:
    ids = corpus_tokenizer.encode(prompt) or [corpus_tokenizer.eot_id]
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(torch.tensor([ids], device=device), tokens, temperature, top_k, gen)
    model.train(was_training)
    return corpus_tokenizer.decode(out[0].tolist())


def model_factory(cfg: GPTRecipe, tokenizer_vocab: int):
    """What `session.build` calls with the layout's parallel pieces: Loom's GPT, or the Hugging
    Face model of `model.hf` spread by its plan."""
    if not cfg.model.hf:
        return lambda par: GPT(cfg.model, par.tensor, par.sequence, par.recompute)
    from core.hf import HFCausalLM
    from core.hf.weights import WeightSource

    folder = hf.resolve_folder(cfg.model.hf)
    config = hf.model_config(folder, cfg.model.seq_len, tokenizer_vocab)
    source = WeightSource(folder) or None

    def build(par):
        if par.sequence is not None and par.sequence.size > 1:
            par.sequence.check(cfg.model.seq_len, config.num_attention_heads // par.tensor.head_parts)
        return HFCausalLM(config, par.tensor, par.sequence, par.recompute, source, cfg.model.gradient_checkpointing)
    return build


def train(cfg: GPTRecipe) -> dict:
    """Run the recipe on this process (and its peers under torchrun); returns the summary."""
    with session(cfg) as s:
        mesh, log = s.mesh, s.log
        corpus: Corpus = prepare_corpus(cfg.data, mesh.world, log)
        cfg = dataclasses.replace(cfg, model=resolve_vocab(cfg.model, corpus.tokenizer.vocab_size))
        torch.manual_seed(cfg.train.seed)
        model = s.build(model_factory(cfg, corpus.tokenizer.vocab_size))
        train_set = TokenWindows(corpus.train_tokens, cfg.model.seq_len, "training split")
        eval_set = (TokenWindows(corpus.val_tokens, cfg.model.seq_len, "validation split")
                    if cfg.data.val_fraction > 0 else None)
        what = (hf.describe(model) if cfg.model.hf else f"GPT: {model.num_params() / 1e6:.2f} M parameters, "
                f"{cfg.model.n_layer} layers x {cfg.model.d_model} wide")
        log(f"{what}, context {cfg.model.seq_len}; corpus {len(corpus.tokens) / 1e6:.2f} M tokens "
            f"({corpus.tokenizer.kind}, vocab {corpus.tokenizer.vocab_size}), {len(train_set)} training windows")

        def add_files(folder: Path) -> None:
            corpus.tokenizer.save(folder)
            if cfg.model.hf and mesh.is_main:
                hf.save_config(model, folder)

        def loss_fn(runner, batch):   # the model's own loss: vocabulary-parallel under tp
            return next_token_loss(runner, batch, model)

        task = TrainTask(model=model, loss_fn=loss_fn, train_data=train_set, eval_data=eval_set,
                         units_per_sample=cfg.model.seq_len, unit="tokens", add_files=add_files,
                         pipeline_input=lambda batch: batch[:, :-1],
                         pipeline_loss=lambda logits, batch: model.loss(logits, batch[:, 1:]))
        summary = s.fit(task, cfg)
        model = s.export(model)           # ordinary tensors again (all ranks)
        # under tensor parallelism every rank of the group takes part in each forward
        if cfg.sample.tokens and (mesh.size("pp") > 1 or mesh.size("sp") > 1):
            log(f"no sample after a pipelined or sequence-parallel run (each rank holds a part); sample from "
                f"the checkpoint: python -m apps.gpt.generate --checkpoint {cfg.output.dir}")
        elif cfg.sample.tokens and (mesh.is_main or mesh.size("tp") > 1):
            text = sample_text(model, corpus.tokenizer, cfg.sample.prompt, cfg.sample.tokens,
                               cfg.sample.temperature, cfg.sample.top_k, cfg.train.seed, mesh.device)
            if mesh.is_main:
                (Path(cfg.output.dir) / "sample.txt").write_text(text + "\n")
                summary["sample"] = text
                print(f"--- sample from the trained model ---\n{text}\n---", file=sys.stderr)
        return summary


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(GPTRecipe, argv, prog="python -m apps.gpt.pretrain", summary=SUMMARY,
                    default_recipe="gpt/tiny")
    if cfg is not None:
        world = detect()
        cfg = plan_recipe(cfg, TARGET, world.world_size, lambda line: print(line, file=sys.stderr) if world.rank == 0
                          else None)
        train(cfg)
    return 0


def console() -> None:
    """The installed command `loom-gpt-pretrain`: `main` with Loom's exit statuses (`core.cli.run_main`)."""
    cli.run_main(main)


if __name__ == "__main__":
    console()
