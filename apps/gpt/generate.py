"""Sample text from a trained GPT checkpoint.

    python -m apps.gpt.generate --checkpoint runs/gpt-tiny --prompt "def " --max-new-tokens 200

`--checkpoint` takes a checkpoint folder (`.../checkpoints/step_0000400`), a run's output
folder (its newest checkpoint is used), or a Hugging Face model folder (GPT-2, Llama or OPT:
config.json, weights and tokenizer.json, such as `apps.gpt.export` writes). A checkpoint carries
its recipe and tokenizer, so nothing else is needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from apps.gpt import hf
from apps.gpt.config import GPTRecipe
from apps.gpt.model import GPT
from apps.gpt.tokenizer import load_tokenizer
from core import cli
from core.checkpoint import CheckpointIO, latest_checkpoint
from core.config import load_recipe
from core.distributed.launch import pick_device
from core.errors import LoomError


def find_checkpoint(path: str, hf_folder: bool = False) -> Path:
    """The checkpoint folder `path` names (a run folder: its newest); with `hf_folder`, a Hugging
    Face model folder (config.json and weights) is taken too."""
    p = Path(path)
    if hf_folder and (p / "config.json").is_file() and not (p / "meta.json").is_file():
        return p
    if (p / "checkpoints").is_dir():
        found = latest_checkpoint(p / "checkpoints")
        if found is None:
            raise LoomError(f"{p} is a run folder but holds no complete checkpoint yet")
        return found
    if not (p / "meta.json").is_file():
        raise LoomError(f"--checkpoint {path}: not a Loom checkpoint folder nor a run folder "
                        f"(expected meta.json or a checkpoints/ folder)"
                        + (" nor a Hugging Face model folder (config.json)" if hf_folder else ""))
    return p


def load_model(folder: Path, device: torch.device) -> tuple[GPT, GPTRecipe]:
    """The model of a checkpoint (Loom's GPT, or the Hugging Face model of a `model.hf` run) and
    its recipe, on one process."""
    cfg = load_recipe(GPTRecipe, folder / "config.yaml")
    model = hf.checkpoint_model(folder) if cfg.model.hf else GPT(cfg.model)
    CheckpointIO().load_model(model, folder)
    return model.to(device).eval(), cfg


def load_any(folder: Path, device: torch.device):
    """A checkpoint's model, or a Hugging Face model folder's (config.json and its weights)."""
    if (folder / "meta.json").is_file():
        return load_model(folder, device)[0]
    from core.hf import HFCausalLM

    return HFCausalLM.from_folder(folder).to(device).eval()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m apps.gpt.generate", description=__doc__.split("\n")[1])
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, run output folder, or Hugging Face "
                                                        "model folder")
    ap.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=40, help="0 = no cut-off (default: %(default)s)")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="keep the fewest most likely tokens whose probabilities reach this (nucleus sampling); "
                         "1 = all (default: %(default)s)")
    ap.add_argument("--stop-at-eot", action="store_true",
                    help="end a sample at the tokenizer's end-of-text token")
    ap.add_argument("--num-samples", type=int, default=1, help="(default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = ap.parse_args(argv)
    for name in ("max_new_tokens", "top_k", "num_samples"):
        if getattr(args, name) < (1 if name == "num_samples" else 0):
            ap.error(f"--{name.replace('_', '-')} must not be negative" if name != "num_samples"
                     else "--num-samples must be at least 1")
    if args.temperature < 0:
        ap.error("--temperature must not be negative")
    if not 0.0 < args.top_p <= 1.0:
        ap.error("--top-p must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = find_checkpoint(args.checkpoint, hf_folder=True)
    device = pick_device(args.device, 0)
    model = load_any(folder, device)
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        stop = tokenizer.eot_id if args.stop_at_eot else None
        out = model.generate(torch.tensor([ids], device=device), args.max_new_tokens,
                             args.temperature, args.top_k, gen, args.top_p, stop)[0].tolist()
        if stop is not None:            # the prompt, and what came before the end-of-text token
            new = out[len(ids):]
            out = ids + new[:new.index(stop)] if stop in new else out
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(tokenizer.decode(out))
    sys.stdout.flush()
    return 0


def console() -> None:
    """The installed command `loom-gpt-generate`: `main` with Loom's exit statuses (`core.cli.run_main`)."""
    cli.run_main(main)


if __name__ == "__main__":
    console()
