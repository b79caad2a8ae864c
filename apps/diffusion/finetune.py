"""Stable Diffusion fine-tuning: `python -m apps.diffusion.finetune [--recipe NAME] [key=value ...]`.

With no arguments it runs `recipes/diffusion/tiny-shapes.yaml`: a tiny Stable Diffusion, built
and cached here, learns to draw coloured shapes from their captions in a few minutes on two
CPU cores. Point `model.pretrained` at a local Stable Diffusion folder and `data.path` at a
folder of captioned images for the real thing; `finetune.method=lora` or `dreambooth` choose
what is trained. Under torchrun it trains with data parallelism.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from apps.diffusion.config import DiffusionRecipe
from apps.diffusion.checks import AXES, check_inputs
from apps.diffusion.data import CaptionedFolder, CaptionedImages, DreamBoothImages, ImageTransform
from apps.diffusion.model import Denoiser, DenoisingLoss, Parts, add_lora, load_parts, tokenize
from apps.diffusion import shapes
from apps.diffusion.pipeline import export_lora, export_pipeline, grid, make_pipeline, render, to_array
from apps.diffusion.prepare import class_images, shapes_folder, tiny_folder
from apps.diffusion import quiet_libraries
from core import cli
from core.distributed import comm
from core.errors import LoomError
from core.memory.usage import peak_bytes, process_bytes, reset_peak
from core.session import session
from core.trainer import TrainTask

SUMMARY = ("Stable Diffusion fine-tuning (full, LoRA, DreamBooth) on a local diffusers model and a "
           "folder of captioned images; by default a tiny model on generated coloured shapes.")


def _dataset(cfg: DiffusionRecipe, parts: Parts, data: CaptionedFolder | Path | None, class_dir: Path | None):
    transform = ImageTransform(cfg.data.resolution, cfg.data.center_crop, cfg.data.random_flip)

    def tok(texts: list[str]) -> torch.Tensor:
        return tokenize(parts.tokenizer, texts)

    if cfg.finetune.method == "dreambooth":
        return DreamBoothImages(cfg.data.instance_dir, cfg.data.instance_prompt, tok, transform,
                                class_dir=class_dir, class_prompt=cfg.data.class_prompt, seed=cfg.train.seed)
    return CaptionedImages(data, tok, transform, cfg.data.image_column, cfg.data.caption_column,
                           caption_dropout=cfg.finetune.caption_dropout, seed=cfg.train.seed)


def _check_paths(cfg: DiffusionRecipe) -> CaptionedFolder | None:
    """Every folder, file and count the recipe names, checked before anything is built, loaded or
    written (see `apps.diffusion.checks`); returns data.path's checked metadata, if it has one."""
    return check_inputs(cfg)


def _check_layout_allows(cfg: DiffusionRecipe, s) -> None:
    """What this app's recipe asks of the weights that the run's layout may not allow."""
    if cfg.validation.prompts and not s.forward_on_one_rank:
        raise LoomError("validation renders on rank 0 alone, but with parallel.zero=3 over several ranks every "
                        "rank must take part in each forward; set validation.prompts=[] or parallel.dp=1")


def run(cfg: DiffusionRecipe) -> dict:
    """Train as the recipe says (on this process and its torchrun peers); returns the summary."""
    checked = _check_paths(cfg)
    quiet_libraries()                  # imports diffusers: after the checks, so a refusal comes at once
    with session(cfg, AXES, "the diffusion app") as s:
        mesh, log = s.mesh, s.log
        _check_layout_allows(cfg, s)
        world = mesh.world
        data = checked
        if cfg.finetune.method != "dreambooth" and cfg.data.path == "shapes":
            data = shapes_folder(cfg.data, world)
        base = tiny_folder(cfg, world, log) if cfg.model.pretrained == "tiny" else Path(cfg.model.pretrained)
        parts = load_parts(base, cfg.model.unet_init, cfg.train.seed)
        if cfg.model.prediction_type:
            parts.scheduler.register_to_config(prediction_type=cfg.model.prediction_type)
        parts.vae.to(mesh.device)
        ft = cfg.finetune
        lora = ft.method == "lora" or (ft.method == "dreambooth" and ft.dreambooth_lora)
        if lora:
            # seeded here: whether the tiny model was just made (drawing random numbers) or read
            # from the cache must not change the adapters' initial weights
            torch.manual_seed(cfg.train.seed)
            add_lora(parts.unet, ft.lora_rank, ft.lora_alpha)
        if cfg.model.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing(s.recompute)   # works with chunked weights too
        model = Denoiser(parts.unet, parts.text_encoder, ft.train_text_encoder and not lora)
        ema = s.average(parts.unet, ft.ema_decay) if ft.ema else None   # kept where the weights are
        samples = Path(cfg.output.dir) / "samples"

        def validation(trainer) -> dict | None:
            if not cfg.validation.prompts:
                return None
            # every rank swaps the average in (with chunked weights that is collective); rank 0 renders
            with (ema.swapped_in() if ema else contextlib.nullcontext()):
                if not mesh.is_main:
                    return None
                with s.between_steps(passes=parts.unet):   # one denoising step's chunk uses predict the next's
                    return _render(trainer)

        def _render(trainer) -> dict:
            v = cfg.validation
            pipe = make_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.unet, parts.scheduler.config)
            row: dict = {}
            with torch.no_grad(), s.autocast():
                images = render(pipe, v.prompts, v.images_per_prompt, v.steps, v.guidance_scale, v.seed,
                                cfg.data.resolution)
                if cfg.data.path == "shapes":   # how often the shape has the colour its prompt asked for
                    specs = shapes.eval_prompts()
                    drawn = render(pipe, [shapes.caption(*s) for s in specs], 1, v.steps, v.guidance_scale,
                                   v.seed + 1000, cfg.data.resolution, batch=len(specs))
                    row["shapes_color_accuracy"] = shapes.colour_accuracy([to_array(im) for im in drawn], specs)
            samples.mkdir(parents=True, exist_ok=True)
            path = samples / f"step_{trainer.step:07d}.png"
            scale = max(1, 256 // cfg.data.resolution)
            grid(images, v.images_per_prompt * max(1, min(len(v.prompts), 8 // v.images_per_prompt)),
                 scale).save(path)
            row["samples"] = str(path)
            return row

        task = TrainTask(model=model, loss_fn=DenoisingLoss(parts.vae, parts.scheduler, ft), train_data=None,
                         unit="images", num_workers=cfg.data.num_workers, on_eval=validation,
                         on_step=(lambda trainer: ema.update()) if ema else None,
                         extra_state={"ema": ema} if ema else {})
        s.prepare(task)               # the weights now live where the layout keeps them (chunks, say)
        class_dir = None
        if ft.method == "dreambooth" and ft.prior_loss_weight > 0:   # rendered within the memory budget
            with s.between_steps(passes=parts.unet):
                class_dir = class_images(cfg, parts, world, log, together=not s.forward_on_one_rank)
        task.train_data = _dataset(cfg, parts, data, class_dir)
        log(f"{ft.method} fine-tuning of {base} on {len(task.train_data)} images at {cfg.data.resolution} px; "
            f"trainable parameters: {sum(q.numel() for q in model.parameters() if q.requires_grad) / 1e6:.3f} M")
        summary = s.fit(task)
        if ema is not None and not lora:   # the export is the average (LoRA exports its adapters as trained)
            ema.use_average()
        device = mesh.device
        before = process_bytes(device)
        reset_peak(device)
        summary.update(_export(cfg, s, parts, base, lora))
        summary["export_peak_memory_bytes"] = peak = peak_bytes(device)
        log(f"export: peak {'device' if device.type == 'cuda' else 'resident'} memory {peak / 2**30:.2f} GiB "
            f"({before / 2**30:.2f} GiB held before it)")
        comm.barrier(world)
        return summary


def _export(cfg: DiffusionRecipe, s, parts: Parts, base: Path, lora: bool) -> dict:
    """Write what a user takes elsewhere: the LoRA adapters, or the whole diffusers pipeline. The
    weights come from `s.weights`, a chunk at a time where they live in chunks (never the whole
    fp32 model in memory); every rank takes part, rank 0 writes."""
    out, main, log = Path(cfg.output.dir), s.mesh.is_main, s.log
    if lora:
        adapters = {}
        for part in s.weights(parts.unet, trained_only=True):
            adapters.update({k: v.clone() for k, v in part.items()})
        if not main:
            return {}
        path = str(export_lora(parts.unet, out / "lora", base, adapters))
        log(f"LoRA weights: {path}/pytorch_lora_weights.safetensors (pipe.load_lora_weights('{path}'))")
        return {"lora": path}
    pipe = make_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, parts.unet, parts.scheduler.config)
    path = export_pipeline(pipe, out / "pipeline" if main else None, s.weights)
    if not main:
        return {}
    log(f"diffusers pipeline: {path} (StableDiffusionPipeline.from_pretrained('{path}'))")
    return {"pipeline": str(path)}


def main(argv: list[str] | None = None, defaults: tuple[str, ...] = ()) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = cli.parse(DiffusionRecipe, list(defaults) + args, prog="python -m apps.diffusion.finetune",
                    summary=SUMMARY, default_recipe="diffusion/tiny-shapes")
    if cfg is not None:
        if cfg.parallel.auto:
            from apps.diffusion.planning import TARGET
            from core.autoparallel.auto import plan_recipe
            from core.distributed import detect

            world = detect()
            cfg = plan_recipe(cfg, TARGET, world.world_size,
                              lambda line: print(line, file=sys.stderr) if world.rank == 0 else None)
        run(cfg)
    return 0


def console() -> None:
    """The installed command `loom-diffusion-finetune`: `main` with Loom's exit statuses (`core.cli.run_main`)."""
    cli.run_main(main)


if __name__ == "__main__":
    console()
