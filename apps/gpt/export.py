"""Export a GPT checkpoint to Hugging Face's format, and read GPT-2 weights back.

    python -m apps.gpt.export runs/gpt-tiny --to hf exported/gpt-tiny

CHECKPOINT is a checkpoint folder (`.../checkpoints/step_0000400`) or a run's output folder (its
newest checkpoint is used). OUT becomes a folder that `transformers.GPT2LMHeadModel.from_pretrained`
(for a run of a `model.hf` model: that model's own class, through `AutoModelForCausalLM`)
and `transformers.AutoTokenizer.from_pretrained` load: config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json and special_tokens_map.json. The folder is
written beside OUT under a temporary name, checked (the Hugging Face model's logits against Loom's,
the tokenizer's ids against Loom's) and only then renamed to OUT, so a failed export leaves nothing.

Loom's GPT is GPT-2's architecture, so the weights only change names, and the linear layers'
weights are transposed (GPT-2's Conv1D stores them as (in, out)). `gpt_state_from_hf` does the
reverse, so that Loom's GPT can start from a GPT-2 folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from apps.gpt.config import GPTModelConfig
from apps.gpt.generate import find_checkpoint, load_model
from apps.gpt.tokenizer import EOT, Tokenizer, load_tokenizer
from core import cli
from core.config import ConfigError
from core.distributed import failure
from core.errors import LoomError

LN_EPS = 1e-5          # Loom's LayerNorm epsilon
TOLERANCE = 1e-4       # largest difference of logits the export accepts
SAMPLE_TEXT = "def export(x):\n    return 'héllo wörld' ∑ 😀  x . y 's\n"

# Loom name -> GPT2LMHeadModel name, and whether the weight is transposed (a Conv1D there).
_TOP = {"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f", "lm_head": "lm_head"}
_BLOCK = {"ln1": ("ln_1", False), "attn.qkv": ("attn.c_attn", True), "attn.proj": ("attn.c_proj", True),
          "ln2": ("ln_2", False), "mlp.fc": ("mlp.c_fc", True), "mlp.proj": ("mlp.c_proj", True)}
# buffers older GPT-2 files carry (the causal mask); nothing in Loom's GPT holds them
_HF_BUFFERS = ("attn.bias", "attn.masked_bias")


# --------------------------------------------------------------------------------------------
# Names and configs
# --------------------------------------------------------------------------------------------

def hf_name(name: str) -> tuple[str, bool]:
    """The GPT2LMHeadModel name of Loom GPT parameter `name`, and whether its weight is transposed."""
    module, _, kind = name.rpartition(".")
    if module in _TOP:
        return f"{_TOP[module]}.{kind}", False
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in _BLOCK:
        target, conv = _BLOCK[parts[2]]
        return f"transformer.h.{parts[1]}.{target}.{kind}", conv and kind == "weight"
    raise LoomError(f"parameter {name} of the GPT has no GPT-2 counterpart; apps.gpt.export does not know "
                    f"this model's layout (was apps/gpt/model.py changed without updating the export?)")


def loom_name(name: str) -> tuple[str, bool] | None:
    """The Loom GPT name of GPT-2 tensor `name` (with or without the `transformer.` prefix) and whether
    it is transposed; None for the attention-mask buffers that older files carry."""
    name = name.removeprefix("transformer.")
    module, _, kind = name.rpartition(".")
    for loom, hf in _TOP.items():
        if module == hf.removeprefix("transformer."):
            return f"{loom}.{kind}", False
    parts = module.split(".", 2)
    if len(parts) == 3 and parts[0] == "h":
        if f"{parts[2]}.{kind}" in _HF_BUFFERS:
            return None
        for loom, (hf, conv) in _BLOCK.items():
            if parts[2] == hf:
                return f"blocks.{parts[1]}.{loom}.{kind}", conv and kind == "weight"
    raise LoomError(f"tensor {name} has no counterpart in Loom's GPT; only GPT-2 (GPT2LMHeadModel) weights load")


def check_exportable(cfg: GPTModelConfig) -> None:
    """Refuse a model GPT-2 cannot express."""
    if not cfg.bias:
        raise LoomError("model.bias=false: GPT-2 (GPT2LMHeadModel) always has biases in its linear layers and "
                        "LayerNorms, so this checkpoint has no GPT-2 form; export models trained with model.bias=true")


def gpt2_config(cfg: GPTModelConfig, eot_id: int):
    """The `transformers.GPT2Config` of a Loom GPT, as `GPT2LMHeadModel.save_pretrained` writes it."""
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=cfg.dropout,
                        embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=LN_EPS,
                        initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_weights,
                        bos_token_id=eot_id, eos_token_id=eot_id)
    config.architectures = ["GPT2LMHeadModel"]
    config.dtype = "float32"
    return config


def gpt2_state(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """A Loom GPT's unsplit state dict under GPT2LMHeadModel's names. With tied weights the head is
    left out, as `save_pretrained` leaves it out (the embedding is stored once)."""
    out = {}
    for name, tensor in state.items():
        target, conv = hf_name(name)
        if tied and target == "lm_head.weight":
            continue
        tensor = tensor.detach().to("cpu", torch.float32)
        out[target] = (tensor.t() if conv else tensor).contiguous()
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def byte_symbols() -> list[str]:
    """The character that GPT-2's byte-level alphabet uses for each byte 0..255: the byte's own
    Latin-1 character when it is printable, otherwise the next free one from U+0100 on."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    spare = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


def byte_tokenizer_json():
    """A `tokenizers` tokenizer whose ids are the UTF-8 bytes 0..255 and 256 for end of text, as
    Loom's ByteTokenizer: a byte-level BPE without merges over the 256 byte symbols in byte order.
    One difference, which Hugging Face's tokenizers share: the text "<|endoftext|>" is read as the
    end-of-text token (256), where Loom's ByteTokenizer reads its 13 bytes."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {symbol: b for b, symbol in enumerate(byte_symbols())}
    vocab[EOT] = 256
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True)])
    return tok


def write_tokenizer(tokenizer: Tokenizer, source: Path, folder: Path, max_length: int) -> None:
    """tokenizer.json and the files with which AutoTokenizer reads it (not Loom's own
    tokenizer_config.json, whose name AutoTokenizer reads too)."""
    if tokenizer.kind == "bpe":
        shutil.copyfile(source / "tokenizer.json", folder / "tokenizer.json")
    elif tokenizer.kind == "bytes":
        byte_tokenizer_json().save(str(folder / "tokenizer.json"))
    else:
        raise LoomError(f"tokenizer kind {tokenizer.kind!r} of {source} has no Hugging Face form")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_length,
              "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def checkpoint_kind(folder: Path) -> str:
    """What a checkpoint holds, as the name of its exporter ("gpt": Loom's GPT)."""
    from apps.gpt.config import GPTRecipe
    from core.config import load_recipe

    if not (folder / "config.yaml").is_file():
        raise LoomError(f"{folder} has no config.yaml, so what model it holds is unknown; give a checkpoint "
                        f"written by python -m apps.gpt.pretrain")
    try:
        recipe = load_recipe(GPTRecipe, folder / "config.yaml")
    except ConfigError as e:
        raise LoomError(f"{folder} does not hold a checkpoint of Loom's GPT (its config.yaml: {e}); export takes "
                        f"checkpoints of python -m apps.gpt.pretrain") from None
    return "hf" if recipe.model.hf else "gpt"


def _export_gpt(folder: Path, tmp: Path) -> dict:
    """Write Loom GPT checkpoint `folder` into `tmp` as a GPT-2 folder and check it; returns the summary."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    model, recipe = load_model(folder, torch.device("cpu"))
    check_exportable(recipe.model)
    tokenizer = load_tokenizer(folder)
    config = gpt2_config(recipe.model, tokenizer.eot_id)
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    save_file(gpt2_state(model.serial_state_dict(), recipe.model.tie_weights), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    write_tokenizer(tokenizer, folder, tmp, recipe.model.seq_len)
    diff = verify(tmp, model, tokenizer, recipe.model.vocab_size, recipe.model.seq_len)
    return {"source": folder, "params": model.num_params(), "max_abs_diff": diff, "class": "GPT2LMHeadModel"}


def _export_hf(folder: Path, tmp: Path) -> dict:
    """Write a checkpoint of a `model.hf` run into `tmp` as its own class's folder (transformers' names
    and layout, a tied head left out) and check it; returns the summary."""
    from transformers import GenerationConfig

    from apps.gpt import hf
    from apps.gpt.config import GPTRecipe
    from core.checkpoint import CheckpointIO
    from core.config import load_recipe
    from core.hf.weights import write_folder

    recipe = load_recipe(GPTRecipe, folder / "config.yaml")
    model = hf.checkpoint_model(folder)
    CheckpointIO().load_model(model, folder)
    model.eval()
    config = model.hf_config()
    pairs, skip = model.hf_state()
    write_folder(tmp, config, pairs, skip)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    tokenizer = load_tokenizer(folder)
    write_tokenizer(tokenizer, folder, tmp, recipe.model.seq_len)
    diff = verify(tmp, model, tokenizer, config.vocab_size, recipe.model.seq_len)
    return {"source": folder, "params": model.num_params(), "max_abs_diff": diff, "class": config.architectures[0]}


_EXPORTERS: dict[str, Callable[[Path, Path], dict]] = {"gpt": _export_gpt, "hf": _export_hf}


@contextlib.contextmanager
def _quiet_transformers():
    """transformers without its progress bars and warnings (the check's loads are an export's detail)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


@torch.no_grad()
def verify(folder: Path, model: torch.nn.Module, tokenizer: Tokenizer, vocab: int, context: int,
           seed: int = 0) -> float:
    """Load `folder` with transformers (the class its config.json names) and compare it with Loom's
    model (one process, whole logits) and tokenizer; returns the largest difference of the logits
    on a few random tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, min(context, 32)), generator=gen)
    diff = (hf(ids).logits.float() - model(ids).float()).abs().max().item()
    if not diff <= TOLERANCE:
        raise LoomError(f"the exported model's logits differ from Loom's by up to {diff:.3g} (more than "
                        f"{TOLERANCE:g}); nothing was written. Report this with the checkpoint's config.yaml")
    with _quiet_transformers():
        hf_ids = hf_tokenizer.encode(SAMPLE_TEXT)
    if hf_ids != tokenizer.encode(SAMPLE_TEXT):
        raise LoomError(f"the exported {tokenizer.kind} tokenizer encodes text to other ids than Loom's; nothing "
                        f"was written. Report this with the checkpoint's tokenizer files")
    return diff


def _check_out(out: Path, source: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LoomError(f"OUT {out} is a file; give a folder (it is made if missing)")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise LoomError(f"OUT {out} holds the checkpoint being exported; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LoomError(f"OUT {out} exists and is not empty; choose a new folder, or replace it with --force")


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` in place of `out` (an old `out` goes only once the new one is there)."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def export_hf(checkpoint_folder: str | Path, out: str | Path, force: bool = False) -> dict:
    """Export a checkpoint (folder or run folder) to a Hugging Face folder `out`, whichever kind of
    model it holds; returns a summary (the files written, parameters, the logits' largest difference)."""
    try:
        folder = find_checkpoint(str(checkpoint_folder))
    except LoomError as e:         # its message names generate's flag; here the path is CHECKPOINT
        raise LoomError(str(e).replace("--checkpoint ", "CHECKPOINT ", 1)) from None
    out = Path(os.path.abspath(Path(out).expanduser()))     # "." and "a/.." get a name for the temporary folder
    _check_out(out, folder, force)
    exporter = _EXPORTERS[checkpoint_kind(folder)]
    tmp = out.parent / f".{out.name}.partial"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        summary = exporter(folder, tmp)
        summary["files"] = sorted(p.name for p in tmp.iterdir())
        _publish(tmp, out)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise LoomError(f"exporting to {out} failed: {e.strerror or e}{where}; check that the folder is writable "
                        f"and the disk has room, then run the export again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["out"] = out
    return summary


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------

def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (`core.hf.weights.WeightSource`: one file, a sharded index, or
    pytorch_model.bin)."""
    from core.hf.weights import WeightSource

    source = WeightSource(folder)
    if not source:
        raise LoomError(f"{folder} has neither model.safetensors nor model.safetensors.index.json; give a folder "
                        f"that GPT2LMHeadModel.save_pretrained wrote")
    return {name: source.get(name) for name in source.names}


def _check_hf_config(config, where: Path) -> None:
    """Refuse a GPT-2 config that Loom's GPT cannot express, naming the key."""
    bad = []
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        bad.append(f"activation_function={config.activation_function!r} (Loom's GPT uses gelu with the tanh "
                   f"approximation: gelu_new)")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(config, key, False):
            bad.append(f"{key}=true (Loom's GPT has no such option)")
    if not getattr(config, "scale_attn_weights", True):
        bad.append("scale_attn_weights=false (Loom's GPT scales attention by 1/sqrt(head size))")
    if config.n_inner not in (None, 4 * config.n_embd):
        bad.append(f"n_inner={config.n_inner} (Loom's GPT has MLPs 4 x n_embd = {4 * config.n_embd} wide)")
    if abs(config.layer_norm_epsilon - LN_EPS) > 1e-12:
        bad.append(f"layer_norm_epsilon={config.layer_norm_epsilon:g} (Loom's LayerNorms use {LN_EPS:g})")
    drops = {k: getattr(config, k) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if len(set(drops.values())) > 1:
        bad.append(", ".join(f"{k}={v:g}" for k, v in drops.items()) + " differ (Loom's GPT has one model.dropout; "
                   "make them equal)")
    if bad:
        raise LoomError(f"{where / 'config.json'}: {bad[0]}, so Loom's GPT cannot start from these weights")


def gpt_state_from_hf(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a GPT-2 folder (config.json and model.safetensors, as GPT2LMHeadModel.save_pretrained
    writes them) as Loom's GPT: the model.* recipe keys that describe it, and its weights under Loom
    GPT's names (the head and the token embedding are one tensor when tied)."""
    from transformers import GPT2Config

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise LoomError(f"{folder} has no config.json; give a folder that GPT2LMHeadModel.save_pretrained wrote")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "gpt2":
        raise LoomError(f"{folder / 'config.json'}: model_type={model_type!r}; Loom's GPT starts only from "
                        f"GPT-2 weights (model_type 'gpt2')")
    config = GPT2Config.from_pretrained(folder)
    _check_hf_config(config, folder)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _read_hf_weights(folder).items():
        mapped = loom_name(name)
        if mapped is not None:
            state[mapped[0]] = (tensor.t() if mapped[1] else tensor).contiguous()
    # transformers ties the head to the embedding unless the file holds a head of other values
    tied = bool(config.tie_word_embeddings) and "wte.weight" in state and (
        "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["wte.weight"]))
    if tied:
        state["lm_head.weight"] = state["wte.weight"]
    model = {"model.n_layer": config.n_layer, "model.n_head": config.n_head, "model.d_model": config.n_embd,
             "model.seq_len": config.n_positions, "model.vocab_size": config.vocab_size,
             "model.dropout": float(config.resid_pdrop), "model.bias": True, "model.tie_weights": tied,
             "model.init_std": float(config.initializer_range)}
    missing = [hf_name(n)[0] for n in _expected_names(config.n_layer) if n not in state]
    if missing:
        raise LoomError(f"{folder}: the weights lack {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                        f"the folder is incomplete or not GPT2LMHeadModel's")
    return model, state


def _expected_names(n_layer: int) -> list[str]:
    """Every parameter name of Loom's GPT with biases and `n_layer` blocks."""
    names = [f"{m}.weight" for m in ("wte", "wpe", "lm_head")] + ["ln_f.weight", "ln_f.bias"]
    return names + [f"blocks.{i}.{m}.{k}" for i in range(n_layer) for m in _BLOCK for k in ("weight", "bias")]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m apps.gpt.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder or run output folder (its newest "
                                                             "checkpoint)")
    ap.add_argument("out", metavar="OUT", help="the folder to write (made if missing; must be empty without --force)")
    ap.add_argument("--to", required=True, choices=("hf",),
                    help="hf: a folder that transformers' GPT2LMHeadModel and AutoTokenizer load")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = export_hf(args.checkpoint, args.out, args.force)
    print(f"wrote {s['out']} ({', '.join(s['files'])}): {s['params'] / 1e6:.2f} M parameters from {s['source']}; "
          f"{s['class']}'s logits match Loom's (max abs diff {s['max_abs_diff']:.2g})")
    sys.stdout.flush()
    return 0


# A stopped export leaves no OUT: the folder is renamed into place only when complete.
STOPPED = failure.Aftermath("nothing was written to OUT", "run the export again")


def console() -> None:
    """`main` with Loom's exit statuses (`core.cli.run_main`)."""
    cli.run_main(main, STOPPED)


if __name__ == "__main__":
    console()
