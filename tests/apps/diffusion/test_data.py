"""The diffusion data: generated shapes, the diffusers metadata convention, and bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from apps.diffusion import shapes
from apps.diffusion.config import DiffusionRecipe
from apps.diffusion.data import CaptionedImages, DreamBoothImages, ImageTransform
from apps.diffusion.model import check_pipeline_folder
from apps.diffusion.tokenizer import check_tokenizer, write_clip_tokenizer
from core.config import ConfigError, load_recipe
from core.errors import LoomError


def fake_tokenize(texts):
    return torch.tensor([[len(t), 0] for t in texts])


def test_shapes_are_deterministic_and_their_colours_read_back(tmp_path):
    a = shapes.generate(tmp_path / "a", n=64, size=32, seed=3)
    b = shapes.generate(tmp_path / "b", n=64, size=32, seed=3)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    for r in rows:
        words = r["text"].split()        # a <colour> <shape> on a <background> background
        img = np.asarray(Image.open(a / r["file_name"]))
        assert np.array_equal(img, np.asarray(Image.open(b / r["file_name"])))
        assert shapes.shape_colour(img, words[5]) == words[1]
        assert words[1] != words[5] and words[2] in shapes.SHAPES


def test_captioned_images_read_the_diffusers_convention(captioned_folder):
    ds = CaptionedImages(captioned_folder, fake_tokenize, ImageTransform(32, center_crop=False),
                         caption_column="caption", seed=1)
    assert len(ds) == 6 and ds.captions[2] == "picture number 2"
    item = ds[(2, 0)]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert -1.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
    assert torch.equal(item["input_ids"], fake_tokenize(["picture number 2"])[0])
    # augmentation and noise seed depend on (seed, index, epoch) only
    again = ds[(2, 0)]
    assert torch.equal(item["pixel_values"], again["pixel_values"]) and item["seed"] == again["seed"]
    assert ds[(2, 1)]["seed"] != item["seed"]


def test_caption_dropout_replaces_some_captions_with_the_empty_one(captioned_folder):
    ds = CaptionedImages(captioned_folder, fake_tokenize, ImageTransform(32), caption_column="caption",
                         caption_dropout=0.5, seed=0)
    dropped = sum(torch.equal(ds[(i % 6, i // 6)]["input_ids"], ds.empty_ids) for i in range(120))
    assert 35 <= dropped <= 85


def test_bad_data_gets_one_clear_message(captioned_folder, tmp_path):
    transform = ImageTransform(32)
    with pytest.raises(LoomError, match="data.path: .*missing does not exist"):
        CaptionedImages(tmp_path / "missing", fake_tokenize, transform)
    (tmp_path / "bare").mkdir()
    with pytest.raises(LoomError, match="has no metadata.jsonl; write one line per image"):
        CaptionedImages(tmp_path / "bare", fake_tokenize, transform)
    with pytest.raises(LoomError, match=r"line 1 has no caption column 'text' \(its columns: caption, file_name\); "
                                        r"set data.caption_column"):
        CaptionedImages(captioned_folder, fake_tokenize, transform)
    (captioned_folder / "img3.png").write_bytes(b"this is not a png")
    with pytest.raises(LoomError, match=r"image .*img3.png cannot be decoded"):
        CaptionedImages(captioned_folder, fake_tokenize, transform, caption_column="caption")
    (captioned_folder / "img3.png").unlink()
    with pytest.raises(LoomError, match=r"image .*img3.png is listed but does not exist"):
        CaptionedImages(captioned_folder, fake_tokenize, transform, caption_column="caption")


def test_resolution_must_be_a_multiple_of_8():
    with pytest.raises(ConfigError, match="data.resolution: got 100; allowed: a multiple of 8"):
        load_recipe(DiffusionRecipe, "diffusion/tiny-shapes", ["data.resolution=100"])


def test_dreambooth_needs_its_prompts_and_folders(tmp_path):
    with pytest.raises(ConfigError, match="finetune.method=dreambooth needs data.instance_dir"):
        load_recipe(DiffusionRecipe, "diffusion/tiny-shapes", ["finetune.method=dreambooth"])
    (tmp_path / "subject").mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "subject" / "a.png")
    ds = DreamBoothImages(tmp_path / "subject", "a photo of sks circle", fake_tokenize, ImageTransform(8),
                          class_dir=None)
    assert len(ds) == 1 and "class_pixel_values" not in ds[(0, 0)]
    with pytest.raises(LoomError, match="data.instance_dir: no images"):
        DreamBoothImages(tmp_path, "x", fake_tokenize, ImageTransform(8))


def test_a_folder_that_is_not_a_diffusers_pipeline(tmp_path):
    with pytest.raises(LoomError, match="is not a diffusers pipeline folder \\(no model_index.json\\)"):
        check_pipeline_folder(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    with pytest.raises(LoomError, match="lacks vae/, text_encoder/, tokenizer/, scheduler/"):
        check_pipeline_folder(tmp_path)


def test_the_written_clip_tokenizer_knows_the_caption_words(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_clip_tokenizer(tmp_path, shapes.WORDS)
    tok = check_tokenizer(CLIPTokenizer.from_pretrained(str(folder), model_max_length=16), folder)
    tokens = tok.convert_ids_to_tokens(tok("a magenta diamond on a cyan background").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "magenta</w>", "diamond</w>", "on</w>", "a</w>", "cyan</w>",
                      "background</w>", "<|endoftext|>"]
    assert tok.decode(tok("zebra 42!").input_ids, skip_special_tokens=True) == "zebra 4 2 !"


def test_every_shipped_diffusion_recipe_is_valid():
    from pathlib import Path
    folder = Path(__file__).resolve().parents[3] / "recipes" / "diffusion"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert names == ["sd15-dreambooth", "sd15-dreambooth-8gb", "sd15-finetune", "sd15-finetune-8gb", "sd15-lora",
                     "sd15-lora-8gb", "tiny-shapes"]
    for name in names:
        cfg = load_recipe(DiffusionRecipe, f"diffusion/{name}")
        assert cfg.data.resolution % 8 == 0
    assert load_recipe(DiffusionRecipe, "diffusion/sd15-lora").finetune.method == "lora"
    assert load_recipe(DiffusionRecipe, "diffusion/sd15-dreambooth").finetune.prior_loss_weight == 1.0
    # the 8 GB recipes: checkpointing with chunks, offloaded, and a layout Loom runs (EMA included)
    from core.layout import check_layout

    for name, offload in (("sd15-finetune-8gb", "nvme"), ("sd15-lora-8gb", "cpu"), ("sd15-dreambooth-8gb", "nvme")):
        cfg = load_recipe(DiffusionRecipe, f"diffusion/{name}")
        assert cfg.model.gradient_checkpointing and cfg.parallel.offload == offload and cfg.memory.device_gb > 0
        check_layout(cfg, 1)
    assert load_recipe(DiffusionRecipe, "diffusion/sd15-finetune-8gb").finetune.ema
