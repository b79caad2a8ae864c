"""Images and captions for diffusion training.

`CaptionedImages` reads the diffusers convention: a folder of images with a `metadata.jsonl`
whose rows name the image (`file_name`) and give its caption (`text`, or `data.caption_column`).
`DreamBoothImages` pairs a folder of subject images and their prompt with class images and
theirs (prior preservation). Every problem with the input (a missing folder, a row without a
caption, an image that does not decode to its end) is found by `check_captioned_folder` and
`list_images`, which the entry points call before they build or load anything, and reported
with the file and the row.

Random augmentation (crop, flip, caption dropout) and the seed of each sample's noise are drawn
from (seed, sample, epoch), not from a global generator: a resumed run sees exactly what an
unbroken run would have, and data-parallel ranks draw exactly what one process would.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from core.errors import LoomError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


_BAD_IMAGE = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _undecodable(path: Path, e: Exception) -> LoomError:
    return LoomError(f"image {path} cannot be decoded ({type(e).__name__}: {e}); "
                     f"remove it or replace it with a valid image")


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except _BAD_IMAGE as e:
        raise _undecodable(path, e) from None


def _verify(path: Path) -> None:
    """Refuse a missing image, or one that does not decode to the end (a truncated file too)."""
    if not path.is_file():
        raise LoomError(f"image {path} is listed but does not exist; add it, or remove its line from metadata.jsonl")
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                im.verify()                 # checks every chunk's CRC, up to IEND: no decoding needed
            else:
                # verify() does not read a JPEG's (or WebP's, BMP's) data, so a truncated one would
                # pass; decode it, at 1/8 scale where the format allows, which still reads it all
                im.draft("RGB", (1, 1))
                im.load()
    except _BAD_IMAGE as e:
        raise _undecodable(path, e) from None


def _verify_all(paths: list[Path]) -> None:
    """`_verify` every path (on a few threads: decoding releases the GIL); the first bad one in
    the list's order is the one reported."""
    if len(paths) < 64:
        for p in paths:
            _verify(p)
        return
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for _ in pool.map(_verify, paths):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)     # after a bad one, check no further


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


@dataclass
class CaptionedFolder:
    """What a folder's metadata.jsonl says, every image in it checked: see `check_captioned_folder`."""

    folder: Path
    files: list[Path]
    captions: list[str]


def check_captioned_folder(folder: str | Path, image_column: str = "file_name",
                           caption_column: str = "text") -> CaptionedFolder:
    """Read `folder/metadata.jsonl` and check every row and every image it names, without
    building anything; each problem is one LoomError naming the file, the line and the fix."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise LoomError(f"data.path: {folder} {what}; give a folder of images with a "
                        f"metadata.jsonl, or 'shapes' for the built-in set")
    meta = path / "metadata.jsonl"
    example = f'{{"{image_column}": "0001.png", "{caption_column}": "a photo of a cat"}}'
    if not meta.is_file():
        raise LoomError(f"{path} has no metadata.jsonl; write one line per image such as {example}")
    try:
        raw = meta.read_bytes()
    except OSError as e:
        raise LoomError(f"{meta} cannot be read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise LoomError(f"{meta} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    files: list[Path] = []
    captions: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoomError(f"{meta} line {n} is not valid JSON ({e.msg}); each line must be an object "
                            f"such as {example}") from None
        if not isinstance(row, dict):
            raise LoomError(f"{meta} line {n} is not a JSON object ({line.strip()[:40]}); each line must be one "
                            f"such as {example}")
        cols = ", ".join(sorted(row)) or "none"
        for column, kind, key, wanted in ((image_column, "image", "data.image_column", "a file name"),
                                          (caption_column, "caption", "data.caption_column", "text")):
            if column not in row:
                raise LoomError(f"{meta} line {n} has no {kind} column '{column}' (its columns: {cols}); "
                                f"set {key} to the right one")
            value = row[column]
            if not isinstance(value, str) or (column == image_column and not value):
                raise LoomError(f"{meta} line {n}: column '{column}' holds {json.dumps(value)[:40]}, not {wanted}")
        files.append(path / row[image_column])
        captions.append(row[caption_column])
    if not files:
        raise LoomError(f"{meta} lists no images; write one line per image such as {example}")
    _verify_all(files)
    return CaptionedFolder(path, files, captions)


class CaptionedImages(Dataset):
    """A folder in the diffusers convention (images + metadata.jsonl), or what
    `check_captioned_folder` read of one."""

    wants_epoch = True   # items are (index, epoch) pairs: augmentation depends on both

    def __init__(self, folder: str | Path | CaptionedFolder, tokenize: Callable[[list[str]], torch.Tensor],
                 transform: ImageTransform, image_column: str = "file_name", caption_column: str = "text",
                 caption_dropout: float = 0.0, seed: int = 0) -> None:
        checked = folder if isinstance(folder, CaptionedFolder) else \
            check_captioned_folder(folder, image_column, caption_column)
        self.folder = checked.folder
        self.files = checked.files
        self.captions = checked.captions
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
    """The images in `folder` (by suffix), each checked to decode; `what` names the recipe key."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        problem = "does not exist" if not path.exists() else "is not a folder"
        raise LoomError(f"{what}: {folder} {problem}; give a folder of images ({', '.join(IMAGE_SUFFIXES)})")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    _verify_all(files)
    return files


def instance_images(folder: str | Path) -> list[Path]:
    """DreamBooth's subject images: at least one, each checked."""
    files = list_images(folder, "data.instance_dir")
    if not files:
        raise LoomError(f"data.instance_dir: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


class DreamBoothImages(Dataset):
    """Subject images with their prompt, each paired with a class image and the class prompt."""

    wants_epoch = True

    def __init__(self, instance_dir: str | Path, instance_prompt: str, tokenize: Callable,
                 transform: ImageTransform, class_dir: str | Path | None = None,
                 class_prompt: str = "", seed: int = 0) -> None:
        self.instances = instance_images(instance_dir)
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
