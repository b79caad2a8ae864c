"""The GPT app on a Hugging Face causal language model (`model.hf=FOLDER`).

The folder holds a transformers `config.json` and, optionally, its weights (a folder with only
config.json starts from random weights). The model is spread by its family's plan
(`core.hf`); the recipe's `model.seq_len`, `data.*` and every `train` / `parallel` / `memory` key
mean what they mean for Loom's own GPT. The keys that describe Loom's GPT (`model.n_layer`,
`model.d_model`, ...) are the config's business and are not read.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import LoomError

CONFIG_FOLDER = "hf"            # where a checkpoint keeps the model's config.json


def resolve_folder(value: str) -> Path:
    """`model.hf` as given, else found among the recipe folders (`gpt/models/llama-tiny` is the one
    that ships beside the recipes), so a recipe names its model folder the way it names recipes."""
    from core.config import recipe_dirs

    p = Path(value).expanduser()
    if p.is_dir() or p.is_absolute():
        return p
    return next((d / value for d in recipe_dirs() if (d / value / "config.json").is_file()), p)


def model_config(folder: Path, seq_len: int, tokenizer_vocab: int):
    """The transformers config of `folder`, checked against the run: its vocabulary must hold the
    tokenizer's, its positions the recipe's context."""
    from core.hf import load_config
    from core.hf.causal_lm import architecture, context_length

    config = load_config(folder)
    if config.vocab_size < tokenizer_vocab:
        raise LoomError(f"model.hf={folder}: config.json has vocab_size={config.vocab_size}, fewer than the "
                        f"tokenizer's {tokenizer_vocab} tokens; raise vocab_size in config.json or lower "
                        f"data.bpe_vocab")
    if seq_len > context_length(config):
        raise LoomError(f"model.seq_len={seq_len} is longer than {architecture(config)}'s context "
                        f"({context_length(config)} positions in {folder}/config.json); use at most that")
    return config


def describe(model) -> str:
    """One line on the model for the run's log (and a note where transformers is not the version the
    plans were checked with)."""
    from core.hf.causal_lm import architecture
    from core.hf.families import version_note

    c = model.config
    note = version_note()
    return (f"{architecture(c)}: {model.num_params() / 1e6:.2f} M parameters, {c.num_hidden_layers} layers x "
            f"{c.hidden_size} wide, {'weights from ' + str(model.source.folder) if model.source else 'random weights'}"
            + (f" ({note})" if note else ""))


def save_config(model, folder: Path) -> None:
    """The model's config.json inside a checkpoint, so that the checkpoint alone rebuilds it."""
    model.hf_config().save_pretrained(str(Path(folder) / CONFIG_FOLDER))


def checkpoint_config(folder: Path):
    """The transformers config a `model.hf` checkpoint was trained with."""
    from core.hf import load_config

    where = Path(folder) / CONFIG_FOLDER
    if not (where / "config.json").is_file():
        raise LoomError(f"{folder}: a model.hf checkpoint without {CONFIG_FOLDER}/config.json; it was not written "
                        f"by this version of Loom")
    return load_config(where)


def checkpoint_model(folder: Path):
    """The model a `model.hf` checkpoint was trained as, on one process, unfilled (the checkpoint's
    weights are loaded into it)."""
    from core.hf import HFCausalLM

    return HFCausalLM(checkpoint_config(folder))
