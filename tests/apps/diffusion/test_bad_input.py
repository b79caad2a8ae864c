"""The diffusion entry points on bad input: a data folder whose metadata or images are broken, a
model folder that is not (or not all of) a diffusers pipeline, a LoRA whose base model is gone,
paths to resume from that are not checkpoints, a batch larger than the data, flags out of range.

Each ends with one `error: ...` line on stderr and exit status 2, without a traceback, and before
anything expensive: no session, no tiny model (its cache stays empty), no model loaded, and
nothing written in output.dir. Nothing here builds a model, so the file runs in seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from apps.diffusion import finetune, sample, train
from apps.diffusion.checks import check_inputs
from apps.diffusion.config import DiffusionRecipe
from apps.diffusion.data import CaptionedFolder
from apps.diffusion.model import check_pipeline_folder
from core import cli
from core.config import load_recipe

REPO = Path(__file__).resolve().parents[3]


# -- helpers ----------------------------------------------------------------------------------

def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def _run(capsys, main, *args: str) -> tuple[int, str]:
    """An entry point as `python -m ...` runs it: its exit status and its stderr."""
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda: main(list(args)))
    return stop.value.code, capsys.readouterr().err


def _one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _images(folder: Path, n: int, suffix: str = ".png") -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(folder / f"{i}{suffix}")
        rows.append({"file_name": f"{i}{suffix}", "text": f"picture {i}"})
    return rows


def _write_meta(folder: Path, rows: list) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def fake_pipeline(folder: Path) -> Path:
    """A folder laid out as StableDiffusionPipeline.save_pretrained writes one (configs, weights
    in safetensors, a tokenizer), with stand-in contents: enough for the checks, nothing loads it."""
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for part, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):
        (folder / part / "config.json").write_text("{}")
        save_file({"weight": torch.zeros(64)}, str(folder / part / f"{weights}.safetensors"))
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    return folder


@pytest.fixture
def places(tmp_path, monkeypatch):
    """output.dir, the cache (both data.cache_dir and $LOOM_CACHE) and a good data folder."""
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tmp_path / "photos"
    _write_meta(data, _images(data, 6))
    return {"out": tmp_path / "out", "cache": tmp_path / "cache", "env_cache": tmp_path / "env-cache",
            "data": data, "tmp": tmp_path}


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Input checks come first: joining the session, making the shapes set or the tiny model, or
    loading a model fails the test."""
    def forbidden(what):
        def call(*a, **k):
            raise AssertionError(f"{what} ran before the input was refused")
        return call

    for name in ("session", "tiny_folder", "shapes_folder", "load_parts", "class_images"):
        monkeypatch.setattr(finetune, name, forbidden(name))
    monkeypatch.setattr(sample, "load_pipeline", forbidden("load_pipeline"))


def _refused(capsys, places, *args: str, main=finetune.main) -> str:
    """Run finetune (or train) into places' output.dir and cache, expect a refusal that leaves
    both untouched, and return its line."""
    out, cache = places["out"], places["cache"]
    before = _tree(out)
    line = _one_line(*_run(capsys, main, f"output.dir={out}", f"data.cache_dir={cache}", "train.micro_batch=4",
                           "train.progress=false", *args))
    assert _tree(out) == before, "output.dir changed"
    assert not cache.exists() and not places["env_cache"].exists(), "the cache was written"
    return line


# -- the data folder --------------------------------------------------------------------------

def _break(kind: str, folder: Path) -> None:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    if kind == "bad json":
        (folder / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n{\"file_name\": \"1.png\", text\n")
    elif kind == "not an object":
        (folder / "metadata.jsonl").write_text(json.dumps(rows[0]) + "\n[\"1.png\", \"picture\"]\n")
    elif kind == "not utf-8":
        (folder / "metadata.jsonl").write_bytes('{"file_name": "0.png", "text": "caf\u00e9"}\n'.encode("latin-1"))
    elif kind == "missing image":
        (folder / "3.png").unlink()
    elif kind == "truncated png":
        _truncate(folder / "2.png")
    elif kind == "not an image":
        (folder / "4.png").write_text("this is a caption, not a picture")
    elif kind == "truncated jpeg":
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "extra.jpg")
        _truncate(folder / "extra.jpg", 0.8)
        _write_meta(folder, rows + [{"file_name": "extra.jpg", "text": "a jpeg"}])
    elif kind == "file name not text":
        _write_meta(folder, rows[:2] + [{"file_name": 7, "text": "seven"}])
    elif kind == "caption not text":
        _write_meta(folder, [{"file_name": "0.png", "text": None}])
    elif kind == "no rows":
        (folder / "metadata.jsonl").write_text("\n\n")
    elif kind == "no metadata":
        (folder / "metadata.jsonl").unlink()
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind,says", [
    ("bad json", "metadata.jsonl line 2 is not valid JSON (Expecting property name enclosed in double quotes); "
                 "each line must be an object such as {\"file_name\": \"0001.png\", \"text\": \"a photo of a cat\"}"),
    ("not an object", "metadata.jsonl line 2 is not a JSON object ([\"1.png\", \"picture\"]); each line must be one"),
    ("not utf-8", "metadata.jsonl line 1 is not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    ("missing image", "3.png is listed but does not exist; add it, or remove its line from metadata.jsonl"),
    ("truncated png", "2.png cannot be decoded (OSError: Truncated File Read); remove it or replace it"),
    ("not an image", "4.png cannot be decoded (UnidentifiedImageError: cannot identify image file"),
    ("truncated jpeg", "extra.jpg cannot be decoded (OSError: image file is truncated"),
    ("file name not text", "metadata.jsonl line 3: column 'file_name' holds 7, not a file name"),
    ("caption not text", "metadata.jsonl line 1: column 'text' holds null, not text"),
    ("no rows", "metadata.jsonl lists no images; write one line per image such as"),
    ("no metadata", "photos has no metadata.jsonl; write one line per image such as"),
])
def test_a_broken_data_folder_is_refused_before_anything_is_built(capsys, places, nothing_expensive, kind, says):
    _break(kind, places["data"])
    line = _refused(capsys, places, f"data.path={places['data']}")
    assert says in line, line


def test_unknown_columns_are_named_with_the_columns_there_are(capsys, places, nothing_expensive):
    data = places["data"]
    assert _refused(capsys, places, f"data.path={data}", "data.caption_column=caption") == (
        f"error: {data}/metadata.jsonl line 1 has no caption column 'caption' (its columns: file_name, text); "
        f"set data.caption_column to the right one")
    assert _refused(capsys, places, f"data.path={data}", "data.image_column=image") == (
        f"error: {data}/metadata.jsonl line 1 has no image column 'image' (its columns: file_name, text); "
        f"set data.image_column to the right one")


def test_a_data_path_that_is_not_a_folder(capsys, places, nothing_expensive):
    missing, a_file = places["tmp"] / "nowhere", places["data"] / "0.png"
    assert _refused(capsys, places, f"data.path={missing}") == (
        f"error: data.path: {missing} does not exist; give a folder of images with a metadata.jsonl, "
        f"or 'shapes' for the built-in set")
    assert _refused(capsys, places, f"data.path={a_file}").startswith(f"error: data.path: {a_file} is not a folder;")


def test_fewer_samples_than_one_global_batch_are_refused_up_front(capsys, places, nothing_expensive):
    data = places["data"]
    assert _refused(capsys, places, f"data.path={data}", "train.micro_batch=4", "train.grad_accum=2") == (
        f"error: data.path: {data} has 6 samples, fewer than one global batch (8 = train.micro_batch 4 x "
        f"grad_accum 2 x dp 1); add data or lower train.micro_batch / train.grad_accum")
    # the generated shapes set too, before it (or the tiny model) is made
    line = _refused(capsys, places, "data.shapes_count=16", "train.micro_batch=32")
    assert line.startswith("error: data.path: shapes (data.shapes_count=16) has 16 samples, fewer than one "
                           "global batch (32 = "), line


def test_the_train_entry_point_checks_the_same_way(capsys, places, nothing_expensive):
    _break("missing image", places["data"])
    line = _refused(capsys, places, f"data.path={places['data']}", main=train.main)
    assert line.endswith("3.png is listed but does not exist; add it, or remove its line from metadata.jsonl")


def test_the_real_command_refuses_a_broken_folder_without_building_the_tiny_model(places):
    """No monkeypatching: the subprocess would start the tiny model's VAE warm-up in an empty
    cache if the data were checked after it."""
    _break("bad json", places["data"])
    env = dict(os.environ, LOOM_CACHE=str(places["env_cache"]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "apps.diffusion.finetune", f"output.dir={places['out']}",
                        f"data.path={places['data']}", "train.micro_batch=2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    line = _one_line(r.returncode, r.stderr)
    assert "metadata.jsonl line 2 is not valid JSON" in line
    assert not places["env_cache"].exists() and not places["out"].exists()


def test_good_input_passes_the_checks_and_goes_on_to_the_session(capsys, places, nothing_expensive):
    """The control for every test above: the same setup, unbroken, is not refused."""
    cfg = load_recipe(DiffusionRecipe, "diffusion/tiny-shapes", [f"data.path={places['data']}",
                                                                  f"output.dir={places['out']}",
                                                                  "train.micro_batch=4"])
    checked = check_inputs(cfg)
    assert isinstance(checked, CaptionedFolder) and len(checked.files) == 6
    with pytest.raises(AssertionError, match="session ran before"):
        finetune.main([f"data.path={places['data']}", f"output.dir={places['out']}", "train.micro_batch=4",
                       f"data.cache_dir={places['cache']}"])


# -- the model and the run folder -------------------------------------------------------------

def _damage(kind: str, folder: Path) -> None:
    if kind == "no model_index.json":
        (folder / "model_index.json").unlink()
    elif kind == "no vae/":
        for f in (folder / "vae").iterdir():
            f.unlink()
        (folder / "vae").rmdir()
    elif kind == "config not JSON":
        (folder / "unet" / "config.json").write_text("{'sample_size': 64,")
    elif kind == "no scheduler config":
        (folder / "scheduler" / "scheduler_config.json").unlink()
    elif kind == "no tokenizer files":
        (folder / "tokenizer" / "tokenizer.json").unlink()
    elif kind == "no weights":
        (folder / "text_encoder" / "model.safetensors").unlink()
    elif kind == "LFS pointer":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 3438167534\n")
    elif kind == "truncated weights":
        _truncate(folder / "vae" / "diffusion_pytorch_model.safetensors", 0.9)
    else:
        raise ValueError(kind)


DAMAGE = [
    ("no model_index.json", "is not a diffusers pipeline folder (no model_index.json); it needs unet/, vae/, "
                            "text_encoder/, tokenizer/, scheduler/ as StableDiffusionPipeline.save_pretrained writes"),
    ("no vae/", "lacks vae/; a Stable Diffusion folder has unet/, vae/, text_encoder/, tokenizer/, scheduler/"),
    ("config not JSON", "has a damaged unet/config.json (not JSON: "),
    ("no scheduler config", "lacks scheduler/scheduler_config.json; it needs unet/"),
    ("no tokenizer files", "has neither tokenizer/tokenizer.json nor tokenizer/vocab.json with merges.txt"),
    ("no weights", "has no weights in text_encoder/ (*.safetensors or *.bin)"),
    ("LFS pointer", "has a Git LFS pointer in place of unet/diffusion_pytorch_model.safetensors; run `git lfs pull`"),
    ("truncated weights", "has a damaged vae/diffusion_pytorch_model.safetensors (Error while deserializing header"),
]


@pytest.mark.parametrize("kind,says", DAMAGE)
def test_an_incomplete_model_folder_is_refused_before_loading(capsys, places, nothing_expensive, kind, says):
    model = fake_pipeline(places["tmp"] / "sd")
    check_pipeline_folder(model)            # complete as made
    _damage(kind, model)
    line = _refused(capsys, places, f"model.pretrained={model}", f"data.path={places['data']}")
    assert line.startswith(f"error: model.pretrained: {model} {says}"), line


def test_paths_to_resume_or_start_from_must_be_checkpoints(capsys, places, nothing_expensive):
    data, out, nowhere = places["data"], places["out"], places["tmp"] / "nowhere"
    common = (f"data.path={data}",)
    assert _refused(capsys, places, *common, f"train.resume={nowhere}") == (
        f"error: train.resume: {nowhere} is not a Loom checkpoint folder (it does not exist); pass 'latest' or "
        f"a folder such as {out}/checkpoints/step_0000100")
    assert _refused(capsys, places, *common, f"train.resume={data}") == (
        f"error: train.resume: {data} is not a Loom checkpoint folder (no meta.json); pass 'latest' or a folder "
        f"such as {out}/checkpoints/step_0000100")
    assert _refused(capsys, places, *common, f"train.init_weights={nowhere}").startswith(
        f"error: train.init_weights: {nowhere} does not exist; give a checkpoint folder")
    assert _refused(capsys, places, *common, f"train.init_weights={data}").startswith(
        f"error: train.init_weights: {data} is not a complete Loom checkpoint folder (no meta.json)")


def test_an_output_dir_that_cannot_hold_the_run(capsys, places, nothing_expensive):
    data, a_file = places["data"], places["data"] / "0.png"
    line = _one_line(*_run(capsys, finetune.main, f"output.dir={a_file}", f"data.path={data}", "train.micro_batch=4"))
    assert line == f"error: output.dir: {a_file} is a file, not a folder; give a folder (it is made if missing)"
    line = _one_line(*_run(capsys, finetune.main, f"output.dir={a_file}/run", f"data.path={data}", "train.micro_batch=4"))
    assert line == f"error: output.dir: {a_file}/run cannot be made, because {a_file} is a file; choose another folder"
    # an earlier run's checkpoints: refused before the model is built, not after
    (places["out"] / "checkpoints" / "step_0000010").mkdir(parents=True)
    (places["out"] / "checkpoints" / "step_0000010" / "meta.json").write_text("{}")
    line = _refused(capsys, places, f"data.path={data}")
    assert line.startswith(f"error: output.dir {places['out']} already holds checkpoints (up to step 10) from an "
                           f"earlier run; continue it with train.resume=latest"), line


def test_layouts_the_diffusion_app_cannot_spread(capsys, places, nothing_expensive, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    line = _refused(capsys, places, f"data.path={places['data']}", "train.micro_batch=2", "parallel.pp=2")
    assert line == ("error: parallel.pp=2: the diffusion app spreads its model with data parallelism (parallel.dp), "
                    "ZeRO (parallel.zero) and offload (parallel.offload) only; set parallel.pp=1")
    # parallel.auto plans before anything is built: a cluster file that does not match the launch is refused
    one = places["out"].parent / "one-device.yaml"
    one.write_text("devices_per_node: 1\n")
    line = _refused(capsys, places, f"data.path={places['data']}", "parallel.auto=true", f"parallel.cluster={one}")
    assert line == f"error: parallel.cluster={one}: it describes 1 devices, this run has 2 processes"


def test_resolution_not_a_multiple_of_8(capsys, places, nothing_expensive):
    line = _refused(capsys, places, f"data.path={places['data']}", "data.resolution=100")
    assert line.startswith("error: data.resolution: got 100; allowed: a multiple of 8"), line


# -- DreamBooth -------------------------------------------------------------------------------

def test_dreambooth_folders_are_checked_up_front(capsys, places, nothing_expensive):
    tmp = places["tmp"]
    db = ("finetune.method=dreambooth", "data.instance_prompt=a photo of sks dog",
          "data.class_prompt=a photo of a dog", "train.micro_batch=1")
    assert _refused(capsys, places, *db, f"data.instance_dir={tmp / 'nowhere'}") == (
        f"error: data.instance_dir: {tmp / 'nowhere'} does not exist; give a folder of images "
        f"(.png, .jpg, .jpeg, .webp, .bmp)")
    (tmp / "empty").mkdir()
    assert _refused(capsys, places, *db, f"data.instance_dir={tmp / 'empty'}") == (
        f"error: data.instance_dir: no images (.png, .jpg, .jpeg, .webp, .bmp) in {tmp / 'empty'}")
    subject = tmp / "subject"
    _images(subject, 3, ".jpg")
    _truncate(subject / "1.jpg", 0.7)
    line = _refused(capsys, places, *db, f"data.instance_dir={subject}")
    assert line.startswith(f"error: image {subject / '1.jpg'} cannot be decoded"), line
    (subject / "1.jpg").unlink()
    line = _refused(capsys, places, *db, f"data.instance_dir={subject}", f"data.class_dir={subject / '0.jpg'}")
    assert line.startswith(f"error: data.class_dir: {subject / '0.jpg'} is not a folder"), line
    assert _refused(capsys, places, *db, f"data.instance_dir={subject}", "data.num_class_images=0") == (
        "error: finetune.prior_loss_weight > 0 needs class images: set data.num_class_images (they are generated), "
        "give data.class_dir with images, or set finetune.prior_loss_weight=0")
    line = _refused(capsys, places, *db, f"data.instance_dir={subject}", "finetune.prior_loss_weight=0",
                    "train.micro_batch=4")
    assert line.startswith(f"error: data.instance_dir: {subject} (with the class images) has 2 samples, fewer "
                           f"than one global batch (4 = "), line


# -- the sample command -----------------------------------------------------------------------

def _sample_refused(capsys, *args: str) -> str:
    return _one_line(*_run(capsys, sample.main, "--prompt", "a red circle", "--steps", "2", *args))


def test_sample_names_the_model_flag_for_a_missing_folder_and_a_non_pipeline(capsys, tmp_path, nothing_expensive):
    missing = tmp_path / "no-such-model"
    assert _sample_refused(capsys, "--model", str(missing)) == (
        f"error: --model {missing}: does not exist; give a diffusers Stable Diffusion folder, or a Loom run "
        f"folder (with pipeline/ or lora/)")
    (tmp_path / "notes.txt").write_text("not a model")
    assert _sample_refused(capsys, "--model", str(tmp_path)) == (
        f"error: --model {tmp_path}: is not a diffusers pipeline folder (no model_index.json); it needs unet/, vae/, "
        f"text_encoder/, tokenizer/, scheduler/ as StableDiffusionPipeline.save_pretrained writes")
    model = fake_pipeline(tmp_path / "sd")
    _damage("LFS pointer", model)
    assert _sample_refused(capsys, "--model", str(model)).startswith(
        f"error: --model {model}: has a Git LFS pointer in place of unet/diffusion_pytorch_model.safetensors")


def test_sample_command_line_as_a_user_runs_it(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "apps.diffusion.sample", "--model", str(tmp_path), "--prompt", "x"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    line = _one_line(r.returncode, r.stderr)
    assert line.startswith(f"error: --model {tmp_path}: is not a diffusers pipeline folder"), line


def _lora(folder: Path, base_info: str | None) -> Path:
    folder.mkdir(parents=True)
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 8)}, str(folder / "pytorch_lora_weights.safetensors"))
    if base_info is not None:
        (folder / "base_model.json").write_text(base_info)
    return folder


def test_sample_with_a_lora_whose_base_model_is_gone_or_unnamed(capsys, tmp_path, nothing_expensive):
    gone = tmp_path / "deleted-base"
    run = tmp_path / "run"
    _lora(run / "lora", json.dumps({"pretrained": str(gone)}))
    assert _sample_refused(capsys, "--model", str(run)) == (
        f"error: --model {run}: its LoRA's base model {gone} (named in base_model.json) does not exist; "
        f"correct {run / 'lora' / 'base_model.json'}, or put the base model back in that place")
    not_sd = tmp_path / "not-sd"
    not_sd.mkdir()
    lora = _lora(tmp_path / "lora2", json.dumps({"pretrained": str(not_sd)}))
    assert _sample_refused(capsys, "--model", str(lora)).startswith(
        f"error: --model {lora}: its LoRA's base model {not_sd} (named in base_model.json) is not a diffusers "
        f"pipeline folder (no model_index.json)")
    lora = _lora(tmp_path / "lora3", "{pretrained: nowhere")
    assert _sample_refused(capsys, "--model", str(lora)).startswith(
        f"error: --model {lora}: {lora / 'base_model.json'} does not name the base model (JSONDecodeError: ")
    lora = _lora(tmp_path / "lora4", json.dumps({"base": "x"}))
    assert _sample_refused(capsys, "--model", str(lora)) == (
        f"error: --model {lora}: {lora / 'base_model.json'} does not name the base model (KeyError: 'pretrained'); "
        f"it must read {{\"pretrained\": \"/path/to/stable-diffusion\"}}")
    lora = _lora(tmp_path / "lora5", None)
    assert _sample_refused(capsys, "--model", str(lora)).startswith(
        f"error: --model {lora}: {lora} holds LoRA weights but no base_model.json naming the model they adapt")
    lora = _lora(tmp_path / "lora6", json.dumps({"pretrained": str(fake_pipeline(tmp_path / "sd"))}))
    _truncate(lora / "pytorch_lora_weights.safetensors", 0.5)
    assert _sample_refused(capsys, "--model", str(lora)).startswith(
        f"error: --model {lora}: has a damaged pytorch_lora_weights.safetensors (")


def test_sample_on_a_run_that_has_not_exported_yet(capsys, tmp_path, nothing_expensive):
    (tmp_path / "checkpoints" / "step_0000010").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text("train:\n  steps: 100\n")
    assert _sample_refused(capsys, "--model", str(tmp_path)) == (
        f"error: --model {tmp_path}: a Loom run folder without an exported pipeline/ or lora/ (the run has not "
        f"finished); let it finish, or resume it with train.resume=latest")


@pytest.mark.parametrize("args,says", [
    (["--resolution", "100"], "error: --resolution 100: must be a positive multiple of 8 (Stable Diffusion's VAE "
                              "downsamples by 8), e.g. 96"),
    (["--resolution", "-16"], "error: --resolution -16: must be a positive multiple of 8 (Stable Diffusion's VAE "
                              "downsamples by 8), e.g. 8"),
    (["--num-images", "0"], "error: --num-images 0: must be at least 1"),
    (["--guidance", "-1"], "error: --guidance -1: must be at least 0 (1 = no guidance)"),
    (["--steps", "many"], "error: argument --steps: invalid int value: 'many'; see python -m apps.diffusion.sample --help"),
    (["--colour", "red"], "error: unrecognized arguments: --colour red; see python -m apps.diffusion.sample --help"),
])
def test_sample_flags_out_of_range_are_one_line(capsys, tmp_path, nothing_expensive, args, says):
    model = fake_pipeline(tmp_path / "sd")
    assert _sample_refused(capsys, "--model", str(model), *args) == says


def test_sample_refuses_an_out_that_is_a_file_before_loading(capsys, tmp_path, nothing_expensive):
    model = fake_pipeline(tmp_path / "sd")
    a_file = tmp_path / "grid.png"
    a_file.write_bytes(b"")
    assert _sample_refused(capsys, "--model", str(model), "--out", str(a_file)) == (
        f"error: --out {a_file}: is a file, not a folder; give a folder (it is made if missing)")
    assert _one_line(*_run(capsys, sample.main, "--model", str(model))) == (
        "error: the following arguments are required: --prompt; see python -m apps.diffusion.sample --help")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_sample_device_cuda_without_cuda(capsys, tmp_path, nothing_expensive):
    assert _sample_refused(capsys, "--model", str(fake_pipeline(tmp_path / "sd")), "--device", "cuda").startswith(
        "error: --device cuda: this torch build sees no CUDA device")
