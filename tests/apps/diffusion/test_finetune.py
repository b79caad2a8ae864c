"""The diffusion app end to end on a very small setting: exports that diffusers loads, LoRA,
DreamBooth, exact resume, data parallelism, and the sample command."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from apps.diffusion import finetune
from apps.diffusion.config import DiffusionRecipe
from apps.diffusion.model import DenoisingLoss
from core.config import load_recipe
from core.distributed.testing import run_distributed
from tests.commands import run_at_once

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("loom-cache")


def recipe(cache, out, *overrides):
    small = [f"data.cache_dir={cache}", f"output.dir={out}", "data.shapes_count=32", "data.resolution=16",
             "model.tiny_vae_steps=3", "model.tiny_width=16", "train.steps=2", "train.micro_batch=4",
             "train.progress=false", "train.log_every=1", "validation.steps=2", "validation.images_per_prompt=1",
             "parallel.device=cpu"]
    return load_recipe(DiffusionRecipe, "diffusion/tiny-shapes", small + list(overrides))


def test_full_finetune_writes_a_pipeline_that_diffusers_loads(cache, tmp_path):
    from diffusers import StableDiffusionPipeline

    summary = finetune.run(recipe(cache, tmp_path, "train.eval_every=1", "finetune.ema=true",
                                  "finetune.snr_gamma=5", "finetune.noise_offset=0.05",
                                  "model.gradient_checkpointing=true"))
    assert (tmp_path / "samples" / "step_0000001.png").is_file() and (tmp_path / "samples" / "step_0000002.png").is_file()
    assert (tmp_path / "loss.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    pipe = StableDiffusionPipeline.from_pretrained(summary["pipeline"])
    image = pipe("a red circle on a blue background", num_inference_steps=2, height=16, width=16,
                 output_type="np").images[0]
    assert image.shape == (16, 16, 3) and np.isfinite(image).all()
    # with EMA on, the exported UNet holds the averaged weights, not the last ones
    exported = load_file(Path(summary["pipeline"]) / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(tmp_path / "checkpoints" / "step_0000002" / "model.safetensors")
    key = "conv_in.weight"
    assert not torch.equal(exported[key], trained[f"unet.{key}"])


def test_lora_writes_weights_that_diffusers_loads(cache, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = recipe(cache, tmp_path, "finetune.method=lora", "finetune.lora_rank=2", "optim.lr=0.05",
                 "parallel.precision=bf16")
    summary = finetune.run(cfg)
    weights = Path(summary["lora"]) / "pytorch_lora_weights.safetensors"
    assert weights.is_file()
    base = json.loads((Path(summary["lora"]) / "base_model.json").read_text())["pretrained"]
    pipe = StableDiffusionPipeline.from_pretrained(base)
    kwargs = dict(num_inference_steps=2, height=16, width=16, output_type="np")
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    pipe.load_lora_weights(summary["lora"])
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert after.shape == (16, 16, 3) and not np.allclose(before, after)
    # the checkpoint's base UNet weights are untouched: only the adapters trained
    state = load_file(tmp_path / "checkpoints" / "step_0000002" / "model.safetensors")
    assert any("lora" in k for k in state)


def test_resume_after_a_stop_is_exact(cache, tmp_path, monkeypatch):
    common = ("train.steps=4", "train.checkpoint_every=2", "validation.prompts=[]", "finetune.caption_dropout=0.2")
    unbroken = finetune.run(recipe(cache, tmp_path / "a", *common))
    calls = {"n": 0}
    real = DenoisingLoss.__call__

    def stop_in_step_4(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, model, batch)

    monkeypatch.setattr(DenoisingLoss, "__call__", stop_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(recipe(cache, tmp_path / "b", *common))
    monkeypatch.setattr(DenoisingLoss, "__call__", real)
    resumed = finetune.run(recipe(cache, tmp_path / "b", *common, "train.resume=latest"))
    assert resumed["loss"] == unbroken["loss"]
    losses = [[json.loads(line).get("loss") for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("a", "b")]
    assert losses[0] == losses[1]
    a = load_file(tmp_path / "a" / "checkpoints" / "step_0000004" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "step_0000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ddp_worker(cache, out):
    summary = finetune.run(recipe(cache, out, "parallel.dp=2", "train.micro_batch=2", "train.steps=3",
                                  "validation.prompts=[]", "finetune.caption_dropout=0.2"))
    return summary["loss"]


def test_two_ranks_train_like_one_process(cache, tmp_path):
    one = finetune.run(recipe(cache, tmp_path / "one", "train.micro_batch=4", "train.steps=3",
                              "validation.prompts=[]", "finetune.caption_dropout=0.2"))
    losses = run_distributed(_ddp_worker, world_size=2, args=(str(cache), str(tmp_path / "two")))
    assert losses[0] == pytest.approx(one["loss"], rel=1e-5)
    a = load_file(tmp_path / "one" / "checkpoints" / "step_0000003" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "step_0000003" / "model.safetensors")
    for k in a:
        assert torch.linalg.norm(a[k] - b[k]) <= 1e-5 * torch.linalg.norm(a[k]) + 1e-8, k


def _dreambooth(cache, out, subject, *overrides):
    return finetune.run(recipe(cache, out, "finetune.method=dreambooth", f"data.instance_dir={subject}",
                               "data.instance_prompt=a photo of sks circle", "data.class_prompt=a photo of a circle",
                               "data.num_class_images=3", "validation.prompts=[]", *overrides))


def _dreambooth_zero3_worker(cache, out, subject):
    # ZeRO-3 over two ranks: every forward gathers the weights from both, so the ranks render the
    # class images in lockstep (rank 1 renders one to throw away), and export a chunk at a time
    summary = _dreambooth(cache, out, subject, "parallel.dp=2", "parallel.zero=3", "parallel.offload=nvme",
                          "memory.chunk_mb=0.2", "memory.device_gb=0.0004", "train.micro_batch=1")
    return summary["loss"]


def test_dreambooth_makes_class_images_with_the_chunked_model_then_trains(cache, tmp_path):
    from PIL import Image

    subject = tmp_path / "subject"
    subject.mkdir()
    for i, colour in enumerate([(220, 30, 30), (200, 40, 40)]):
        Image.new("RGB", (24, 24), colour).save(subject / f"{i}.png")
    plain = _dreambooth(cache, tmp_path / "plain", subject, "train.micro_batch=2")
    names = ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert sorted(p.name for p in (tmp_path / "plain" / "class_images").iterdir()) == names
    assert Path(plain["pipeline"], "model_index.json").is_file()
    losses = run_distributed(_dreambooth_zero3_worker, world_size=2,
                             args=(str(cache), str(tmp_path / "zero3"), str(subject)))
    assert sorted(p.name for p in (tmp_path / "zero3" / "class_images").iterdir()) == names
    for name in names:     # the same images from the same weights and seeds, wherever the weights live
        a, b = (np.asarray(Image.open(tmp_path / d / "class_images" / name), dtype=np.int16) for d in ("plain", "zero3"))
        assert np.abs(a - b).max() <= 1, name
    assert losses[0] == pytest.approx(plain["loss"], rel=1e-4)
    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = (load_file(tmp_path / d / "pipeline" / unet) for d in ("plain", "zero3"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.linalg.norm(a[k] - b[k]) <= 1e-4 * torch.linalg.norm(a[k]) + 1e-8, k


def test_prompts_rendered_together_match_prompts_rendered_one_by_one(cache, tmp_path):
    """The colour score renders its 56 prompts in one batch: each image is the one its prompt gets
    alone (its own seeded noise), whatever else is in the batch."""
    from diffusers import StableDiffusionPipeline

    from apps.diffusion.pipeline import render
    from apps.diffusion.prepare import tiny_folder
    from core.distributed import Layout, ParallelMesh

    cfg = recipe(cache, tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder(cfg, ParallelMesh.build(Layout()).world, print))
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a blue square on a white background", "a green triangle"]
    alone = render(pipe, prompts, 2, 3, 3.0, seed=7, resolution=16)
    together = render(pipe, prompts, 2, 3, 3.0, seed=7, resolution=16, batch=3)
    pairs = render(pipe, prompts, 2, 3, 3.0, seed=7, resolution=16, batch=2)
    assert len(alone) == len(together) == len(pairs) == 6
    arrays = [[np.asarray(im, dtype=np.int16) for im in images] for images in (alone, together, pairs)]
    for i in range(6):
        assert np.abs(arrays[0][i] - arrays[1][i]).max() <= 1 and np.abs(arrays[0][i] - arrays[2][i]).max() <= 1, i
    assert np.abs(arrays[0][0] - arrays[0][2]).max() > 8      # (different prompts and noise: different images)


def _run_cli(commands, cache):
    """`python -m ...` commands, started together (each spends seconds importing diffusers)."""
    return run_at_once([[sys.executable, *args] for args in commands],
                       env=dict(os.environ, LOOM_CACHE=str(cache), OMP_NUM_THREADS="1"))


def test_sample_command_and_its_errors(cache, tmp_path):
    finetune.run(recipe(cache, tmp_path / "run", "train.steps=1", "validation.prompts=[]"))
    r, bad = _run_cli([["-m", "apps.diffusion.sample", "--model", str(tmp_path / "run"), "--prompt", "a red circle",
                        "--prompt", "a blue square", "--num-images", "2", "--steps", "2", "--out", str(tmp_path / "s")],
                       ["-m", "apps.diffusion.sample", "--model", str(tmp_path), "--prompt", "x"]], cache)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s").glob("*-a-red-circle-*.png"))) == 2 and (tmp_path / "s" / "grid.png").is_file()
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --model {tmp_path}: is not a diffusers pipeline folder (no model_index.json); "
        "it needs unet/, vae/, text_encoder/, tokenizer/, scheduler/ as StableDiffusionPipeline.save_pretrained writes"]


def test_finetune_command_line_errors(cache, tmp_path):
    cases = [
        (["data.resolution=30"], "error: data.resolution: got 30; allowed: a multiple of 8"),
        ([f"model.pretrained={tmp_path}"], "error: model.pretrained: "),
        ([f"data.path={tmp_path / 'nope'}"], "error: data.path: "),
    ]
    results = _run_cli([["-m", "apps.diffusion.finetune", f"output.dir={tmp_path / str(i)}", "data.shapes_count=32",
                         "data.resolution=16", "model.tiny_vae_steps=3", *args] for i, (args, _) in enumerate(cases)],
                       cache)
    for (args, message), r in zip(cases, results):
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith(message), (args, r.stderr)
        assert not any("Traceback" in line for line in lines)


def test_lora_with_nvme_offload_trains_like_plain(cache, tmp_path):
    """parallel.offload=nvme with a device budget of two 0.2 MB chunks: the UNet streams through
    in every step, and the adapters end where the plain run's do."""
    common = ("finetune.method=lora", "finetune.lora_rank=2", "optim.lr=0.05", "validation.prompts=[]",
              "finetune.caption_dropout=0")
    plain = finetune.run(recipe(cache, tmp_path / "plain", *common))
    offload = finetune.run(recipe(cache, tmp_path / "nvme", *common, "parallel.offload=nvme",
                                  "memory.chunk_mb=0.2", "memory.device_gb=0.0004"))
    assert plain["loss"] == pytest.approx(offload["loss"], rel=1e-5)
    a = load_file(Path(plain["lora"]) / "pytorch_lora_weights.safetensors")
    b = load_file(Path(offload["lora"]) / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.linalg.norm(a[k] - b[k]) <= 1e-5 * torch.linalg.norm(a[k]), k


def test_the_small_memory_recipe_combination_exports_what_plain_pytorch_does(cache, tmp_path):
    """Full fine-tuning with gradient checkpointing, NVMe offload under a budget that evicts, EMA
    and validation all on (what the 8 GB recipes turn on): the exported UNet is the plain run's
    average, and the validation images are rendered from the chunked model."""
    common = ("finetune.ema=true", "finetune.ema_decay=0.9", "model.gradient_checkpointing=true",
              "train.eval_every=2", "finetune.caption_dropout=0", "train.steps=3")
    plain = finetune.run(recipe(cache, tmp_path / "plain", *common))
    small = finetune.run(recipe(cache, tmp_path / "nvme", *common, "parallel.offload=nvme",
                                "memory.chunk_mb=0.2", "memory.device_gb=0.0004"))
    assert small["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert (tmp_path / "nvme" / "samples" / "step_0000002.png").is_file()
    # the chunked run's pipeline is written a chunk at a time: the same files, configs and
    # weights as the plain run's, and as diffusers' own save_pretrained writes them
    from diffusers import StableDiffusionPipeline

    one, two = Path(plain["pipeline"]), Path(small["pipeline"])
    StableDiffusionPipeline.from_pretrained(one).save_pretrained(tmp_path / "resaved")
    _same_folders(tmp_path / "resaved", two, only=("unet/", "vae/", "text_encoder/", "model_index.json"))
    _same_folders(one, two)
    b = load_file(two / "unet/diffusion_pytorch_model.safetensors")
    trained = load_file(tmp_path / "nvme" / "checkpoints" / "step_0000003" / "model.safetensors")
    assert not torch.equal(b["conv_in.weight"], trained["unet.conv_in.weight"])    # the average, not the last


def _same_folders(one: Path, two: Path, only: tuple[str, ...] = ("",)) -> None:
    """Two exported pipelines hold the same files, configs and (to 1e-5) weights (`only`: the
    files whose paths start so)."""
    def listed(folder: Path) -> list[str]:
        return sorted(n for n in (str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
                      if n.startswith(only))

    files = listed(one)
    assert files == listed(two)
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "model_index.json"} <= set(files)
    for f in files:
        if f.endswith(".json"):     # (_name_or_path: where the saved object had been loaded from)
            a, b = ({k: v for k, v in json.loads((d / f).read_text()).items() if k != "_name_or_path"}
                    for d in (one, two))
            assert a == b, f
        elif f.endswith(".safetensors"):
            a, b = load_file(one / f), load_file(two / f)
            assert a.keys() == b.keys(), f
            for k in a:
                assert a[k].dtype == b[k].dtype, (f, k)
                assert torch.linalg.norm(a[k] - b[k]) <= 1e-5 * torch.linalg.norm(a[k]) + 1e-8, (f, k)
