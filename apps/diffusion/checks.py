"""Everything a diffusion run's recipe points at, checked before anything is built or loaded.

Building the tiny model, loading a real one, joining the process group and generating class
images take from seconds to many minutes; a wrong path or a broken data folder must not cost
them. `check_inputs` reads only small files (metadata, configs) and checks that every image
decodes, and it writes nothing: a refused run leaves output.dir and the cache as they were.
"""

from __future__ import annotations

from pathlib import Path

from apps.diffusion.config import DiffusionRecipe
from apps.diffusion.data import CaptionedFolder, check_captioned_folder, instance_images, list_images
from apps.diffusion.model import check_pipeline_folder
from core.cache import cache_dir
from core.distributed import detect
from core.layout import check_layout
from core.errors import LoomError, named
from core.run_folder import check_run_folder, check_writable

AXES = ("dp",)      # the UNet is spread with data parallelism (and ZeRO, offload), not split


def _dreambooth_samples(cfg: DiffusionRecipe) -> int:
    """Subject images checked; the class images there are and will be; the samples per epoch."""
    d, f = cfg.data, cfg.finetune
    instances = len(instance_images(d.instance_dir))
    if f.prior_loss_weight <= 0:
        return instances                       # class images are not used
    # class images go to data.class_dir, or to output.dir/class_images (checked writable already)
    folder = d.class_dir or str(Path(cfg.output.dir) / "class_images")
    have = len(list_images(folder, "data.class_dir")) if Path(folder).expanduser().exists() else 0
    if d.class_dir and have < d.num_class_images:       # the missing ones are generated into it
        check_writable(d.class_dir, "data.class_dir")
    if max(have, d.num_class_images) == 0:
        raise LoomError("finetune.prior_loss_weight > 0 needs class images: set data.num_class_images (they are "
                        "generated), give data.class_dir with images, or set finetune.prior_loss_weight=0")
    return max(instances, have, d.num_class_images)


def _check_layout_and_batch(cfg: DiffusionRecipe, samples: int, what: str) -> None:
    _, plan = check_layout(cfg, detect().world_size, axes=AXES, what="the diffusion app")
    if samples < plan.global_batch:
        raise LoomError(f"{what} has {samples} samples, fewer than one global batch ({plan.global_batch} = "
                        f"train.micro_batch {plan.micro_batch} x grad_accum {plan.grad_accum} x dp "
                        f"{plan.global_batch // (plan.micro_batch * plan.grad_accum)}); "
                        f"add data or lower train.micro_batch / train.grad_accum")


def check_inputs(cfg: DiffusionRecipe) -> CaptionedFolder | None:
    """Check every path and count the recipe names; returns what data.path's metadata says (so it
    is not read twice), or None for the generated shapes and for DreamBooth."""
    if cfg.model.pretrained != "tiny":
        check_pipeline_folder(cfg.model.pretrained)
    check_run_folder(cfg.output, cfg.train)
    d = cfg.data
    checked = None
    if cfg.finetune.method == "dreambooth":
        samples, what = _dreambooth_samples(cfg), f"{named('data.instance_dir', d.instance_dir)} (with the class images)"
    elif d.path == "shapes":
        samples, what = d.shapes_count, f"data.path: shapes (data.shapes_count={d.shapes_count})"
    else:
        checked = check_captioned_folder(d.path, d.image_column, d.caption_column)
        samples, what = len(checked.files), named("data.path", d.path)
    if cfg.model.pretrained == "tiny" or (d.path == "shapes" and cfg.finetune.method != "dreambooth"):
        check_writable(cache_dir(d.cache_dir), "data.cache_dir" if d.cache_dir else "the cache ($LOOM_CACHE)")
    _check_layout_and_batch(cfg, samples, what)
    return checked
