"""Sample text from a trained GPT checkpoint, or from a model larger than memory.

    python -m apps.gpt.generate --checkpoint runs/gpt-tiny --prompt "def " --max-new-tokens 200
    python -m apps.gpt.generate --checkpoint big/ --prompt-file prompts.txt --temperature 0 \
        memory.device_gb=2 parallel.offload=nvme memory.nvme_dir=/mnt/nvme --explain

`--checkpoint` takes a checkpoint folder (`.../checkpoints/step_0000400`), a run's output
folder (its newest checkpoint is used), or a Hugging Face model folder (GPT-2, Llama or OPT:
config.json, weights and tokenizer.json, such as `apps.gpt.export` writes). A checkpoint carries
its recipe and tokenizer, so nothing else is needed.

Prompts (one, or one per line of `--prompt-file`) are generated together in micro-batches of
`--batch-size` rows with a KV cache (`core.inference`). Where the weights do not fit
`memory.device_gb` (on a CPU-only machine: the memory free), they stay in host memory or in a file
on NVMe and stream through the device a layer at a time, read ahead while the layer before computes;
`generate.micro_batches=N` runs N micro-batches through each layer while it is resident, so one read
of the weights serves N x batch rows. A cost model picks what is not given (`--explain` shows its
reasoning); the run prints the placement and its tokens/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from apps.gpt import hf
from apps.gpt.config import GPTRecipe
from apps.gpt.model import GPT
from apps.gpt.tokenizer import load_tokenizer
from core import cli
from core.checkpoint import CheckpointIO, latest_checkpoint
from core.config import load_recipe
from core.distributed.launch import launch
from core.errors import LoomError
from core.inference.engine import check_context
from core.inference.runner import Settings, build_engine


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


def _bool(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return value.lower() in ("true", "1")


SETTINGS = {"memory.device_gb": ("device_gb", float), "parallel.offload": ("offload", str),
            "memory.nvme_dir": ("nvme_dir", str), "memory.chunk_mb": ("chunk_mb", float),
            "memory.io_threads": ("io_threads", int), "generate.micro_batches": ("micro_batches", int),
            "generate.kv": ("kv", str), "generate.direct_io": ("direct_io", _bool),
            "generate.decode_threads": ("decode_threads", int)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_settings(pairs: list[str]) -> Settings:
    """`key=value` overrides of where the generation keeps things (`core.inference.runner.Settings`)."""
    settings = Settings()
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in SETTINGS:
            raise LoomError(f"{pair!r}: generate takes key=value settings among {', '.join(SETTINGS)}")
        field, kind = SETTINGS[key]
        try:
            setattr(settings, field, kind(value))
        except ValueError:
            what = {int: "n integer", float: " number", _bool: " boolean (true or false)"}.get(kind, " value")
            raise LoomError(f"{key}={value}: not a{what}") from None
    if (settings.device_gb < 0 or settings.micro_batches < 0 or settings.chunk_mb <= 0 or settings.io_threads < 0
            or settings.decode_threads < 0):
        raise LoomError("memory.device_gb, generate.micro_batches, memory.io_threads and generate.decode_threads "
                        "must not be negative (0: chosen for you) and memory.chunk_mb must be positive")
    return settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m apps.gpt.generate", description=__doc__.split("\n")[1],
                                 epilog="settings: " + ", ".join(f"{k}=..." for k in SETTINGS))
    ap.add_argument("--checkpoint", required=True, help="checkpoint folder, run output folder, or Hugging Face "
                                                        "model folder")
    ap.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    ap.add_argument("--prompt-file", default="", help="one prompt per line (blank lines skipped); replaces --prompt")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=40, help="0 = no cut-off (default: %(default)s)")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="keep the fewest most likely tokens whose probabilities reach this (nucleus sampling); "
                         "1 = all (default: %(default)s)")
    ap.add_argument("--stop-at-eot", action="store_true",
                    help="end a sample at the tokenizer's end-of-text token")
    ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="rows per micro-batch; 0 = every row in one (default: %(default)s)")
    ap.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                    help="precision of the weights while generating; auto = as stored (default: %(default)s)")
    ap.add_argument("--explain", action="store_true", help="print why the placement was chosen, and the others")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("settings", nargs="*", help="key=value: " + ", ".join(SETTINGS))
    args = ap.parse_args(argv)
    for name in ("max_new_tokens", "top_k", "num_samples", "batch_size"):
        if getattr(args, name) < (1 if name in ("num_samples", "max_new_tokens") else 0):
            ap.error(f"--{name.replace('_', '-')} must be at least 1" if name in ("num_samples", "max_new_tokens")
                     else f"--{name.replace('_', '-')} must not be negative")
    if args.temperature < 0:
        ap.error("--temperature must not be negative")
    if not 0.0 < args.top_p <= 1.0:
        ap.error("--top-p must be in (0, 1]")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    if not args.prompt_file:
        return [args.prompt]
    path = Path(args.prompt_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LoomError(f"--prompt-file {path}: cannot be read ({e})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LoomError(f"--prompt-file {path}: no prompts (one per line)")
    return prompts


def meta_model(folder: Path, mode=None):
    """The model of a checkpoint or Hugging Face folder on the meta device (split by `mode`, a 1D
    tensor-parallel mode, when given), how to fill in each of its parameters (this rank's part),
    and the dtype its weights are stored in."""
    from core.checkpoint.convert import Source
    from core.checkpoint.sharding import SplitDraw
    from core.hf import HFCausalLM

    if (folder / "meta.json").is_file():
        cfg = load_recipe(GPTRecipe, folder / "config.yaml")
        with torch.device("meta"):
            if cfg.model.hf:
                model = HFCausalLM(hf.checkpoint_config(folder), mode)
            else:
                model = GPT(cfg.model, mode)
        source = Source(folder)
        ties = source.tie_metadata()

        def read(name: str, out: torch.Tensor) -> None:
            key = name if name in source.names else ties.get(name, name)
            if key not in source.names:
                raise LoomError(f"{folder}: the checkpoint has no tensor {name}")
            out.copy_(source.read(key))

        return model, SplitDraw(model, read), source.shape_dtype(next(iter(source.names)))[1]
    with torch.device("meta"):
        model = HFCausalLM.from_folder(folder, mode)
    stored = torch.float32
    if model.source is not None:
        stored = model.source.get(model.source.names[0]).dtype
    return model, SplitDraw(model, model.init_parameter), stored


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = parse_settings(args.settings)
    folder = find_checkpoint(args.checkpoint, hf_folder=True)
    tokenizer = load_tokenizer(folder)
    texts = read_prompts(args)
    prompts = [tokenizer.encode(t) or [tokenizer.eot_id] for t in texts for _ in range(args.num_samples)]
    with launch(args.device) as rt:
        return generate(args, settings, folder, tokenizer, prompts, rt)


def generate(args, settings, folder: Path, tokenizer, prompts: list[list[int]], rt) -> int:
    """On one process, or on every rank of a torchrun job with the model split over them (1D tensor
    parallelism, each rank streaming its own part when streaming)."""
    device, main_rank = rt.device, rt.is_main
    mode = None
    if rt.world_size > 1:
        from core.distributed import Layout, ParallelMesh
        from core.tensor import make_mode

        mode = make_mode("1d", ParallelMesh.build(Layout(tp=rt.world_size), device))
    model, materialize, stored = meta_model(folder, mode)
    dtype = stored if args.dtype == "auto" else DTYPES[args.dtype]
    if not dtype.is_floating_point:
        dtype = torch.float32
    batch = args.batch_size or len(prompts)
    longest = max(len(p) for p in prompts)
    check_context(model.inference_shape()["context"], longest, args.max_new_tokens)     # before the build
    engine, placement = build_engine(model, materialize, device, dtype, settings, batch, longest,
                                     args.max_new_tokens, len(prompts))
    del materialize                             # the checkpoint's files: every weight is made
    split = f" (each of {rt.world_size} ranks holds 1/{rt.world_size}: parallel.tp_mode=1d)" if mode else ""
    if main_rank:
        print(f"placement: {placement.summary()}{split}", file=sys.stderr)
    if args.explain and main_rank:
        for line in placement.lines:
            print(f"  {line}", file=sys.stderr)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    stop = tokenizer.eot_id if args.stop_at_eot else None
    groups = -(-len(prompts) // (batch * placement.micro_batches))
    bar = tqdm(total=groups * args.max_new_tokens, desc="token steps", unit="step", file=sys.stderr,
               mininterval=1.0, disable=not sys.stderr.isatty() or not main_rank)
    try:
        result = engine.generate(prompts, args.max_new_tokens, batch, placement.micro_batches, args.temperature,
                                 args.top_k, args.top_p, stop, gen, pad=tokenizer.eot_id,
                                 progress=lambda done, total: bar.update(1))
    finally:
        bar.close()
        engine.close()
    if not main_rank:
        return 0
    for i, (ids, new) in enumerate(zip(prompts, result.tokens)):
        if len(prompts) > 1:
            print(f"--- sample {i + 1} ---")
        print(tokenizer.decode(ids + new))
    read = f", {result.bytes_read / 2**30:.2f} GiB of weights read" if engine.stream is not None else ""
    print(f"generated {result.token_steps} tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s "
          f"({len(prompts)} rows, micro_batches={placement.micro_batches}, prefill {result.prefill_seconds:.2f} s"
          f"{read})", file=sys.stderr)
    sys.stdout.flush()
    return 0


def console() -> None:
    """The installed command `loom-gpt-generate`: `main` with Loom's exit statuses (`core.cli.run_main`)."""
    cli.run_main(main)


if __name__ == "__main__":
    console()
