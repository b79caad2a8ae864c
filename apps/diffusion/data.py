"""Images and captions for diffusion training.

`CaptionedImages` reads the diffusers convention: a folder of images with a `metadata.jsonl`
whose rows name the image (`file_name`) and give its caption (`text`, or `data.caption_column`).
`DreamBoothImages` pairs a folder of subject images and their prompt with class images and
theirs (prior preservation). Every problem with the input (a missing folder, a row without a
caption, an image that does not decode) is found when the dataset is opened, before training,
and reported with the file and the row.

Random augmentation (crop, flip, caption dropout) and the seed of each sample's noise are drawn
from (seed, sample, epoch), not from a global generator: a resumed run sees exactly what an
unbroken run would have, and data-parallel ranks draw exactly what one process would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from core.errors import LoomError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise LoomError(f"image {path} cannot be decoded ({type(e).__name__}: {e}); "
                        f"remove it or replace it with a valid image") from None


def _verify(path: Path) -> None:
    if not path.is_file():
        raise LoomError(f"image {path} is listed but does not exist")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise LoomError(f"image {path} cannot be decoded ({type(e).__name__}: {e}); "
                        f"remove it or replace it with a valid image") from None


class ImageTransform:
    """Resize the shorter side to `resolution`, crop a square, maybe flip; to [-1, 1] CHW."""

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = True) -> None:
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        if (w, h) != (r, r):
            image = image.resize((max(r, round(w * scale)), max(r, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        if self.center_crop:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left, top = int(rng.integers(0, w - r + 1)), int(rng.integers(0, h - r + 1))
        image = image.crop((left, top, left + r, top + r))
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        if self.random_flip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _rng(seed: int, index: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, epoch])


def _noise_seed(rng: np.random.Generator) -> torch.Tensor:
    """The seed of this sample's noise, latent sample and timestep (see DenoisingLoss)."""
    return torch.tensor(int(rng.integers(2**62)), dtype=torch.int64)


class CaptionedImages(Dataset):
    """A folder in the diffusers convention (images + metadata.jsonl)."""

    wants_epoch = True   # items are (index, epoch) pairs: augmentation depends on both

    def __init__(self, folder: str | Path, tokenize: Callable[[list[str]], torch.Tensor],
                 transform: ImageTransform, image_column: str = "file_name", caption_column: str = "text",
                 caption_dropout: float = 0.0, seed: int = 0) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise LoomError(f"data.path: {folder} is not a folder; give a folder of images with a "
                            f"metadata.jsonl, or 'shapes' for the built-in set")
        meta = self.folder / "metadata.jsonl"
        if not meta.is_file():
            raise LoomError(f"{self.folder} has no metadata.jsonl; write one line per image such as "
                            f'{{"{image_column}": "0001.png", "{caption_column}": "a photo of a cat"}}')
        self.files: list[Path] = []
        self.captions: list[str] = []
        for n, line in enumerate(meta.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoomError(f"{meta} line {n} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict) or image_column not in row:
                raise LoomError(f"{meta} line {n} has no '{image_column}' (data.image_column)")
            if caption_column not in row or not isinstance(row[caption_column], str):
                cols = ", ".join(sorted(row)) if isinstance(row, dict) else ""
                raise LoomError(f"{meta} line {n} has no caption column '{caption_column}' (its columns: "
                                f"{cols}); set data.caption_column to the right one")
            path = self.folder / row[image_column]
            _verify(path)
            self.files.append(path)
            self.captions.append(row[caption_column])
        if not self.files:
            raise LoomError(f"{meta} lists no images")
        self.ids = tokenize(self.captions)
        self.empty_ids = tokenize([""])[0]
        self.transform = transform
        self.caption_dropout = caption_dropout
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = _rng(self.seed, index, epoch)
        pixels = self.transform(_open_rgb(self.files[index]), rng)
        ids = self.ids[index]
        if self.caption_dropout and rng.random() < self.caption_dropout:
            ids = self.empty_ids
        return {"pixel_values": pixels, "input_ids": ids, "seed": _noise_seed(rng)}


def list_images(folder: str | Path, what: str) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LoomError(f"{what}: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    for p in files:
        _verify(p)
    return files


class DreamBoothImages(Dataset):
    """Subject images with their prompt, each paired with a class image and the class prompt."""

    wants_epoch = True

    def __init__(self, instance_dir: str | Path, instance_prompt: str, tokenize: Callable,
                 transform: ImageTransform, class_dir: str | Path | None = None,
                 class_prompt: str = "", seed: int = 0) -> None:
        self.instances = list_images(instance_dir, "data.instance_dir")
        if not self.instances:
            raise LoomError(f"data.instance_dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {instance_dir}")
        self.classes = list_images(class_dir, "data.class_dir") if class_dir else []
        self.instance_ids = tokenize([instance_prompt])[0]
        self.class_ids = tokenize([class_prompt])[0] if self.classes else None
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = _rng(self.seed, index, epoch)
        item = {"pixel_values": self.transform(_open_rgb(self.instances[index % len(self.instances)]), rng),
                "input_ids": self.instance_ids, "seed": _noise_seed(rng)}
        if self.classes:
            item["class_pixel_values"] = self.transform(_open_rgb(self.classes[index % len(self.classes)]), rng)
            item["class_input_ids"] = self.class_ids
            item["class_seed"] = _noise_seed(rng)
        return item
