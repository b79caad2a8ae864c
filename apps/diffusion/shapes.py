"""The embedded default dataset: coloured shapes on coloured backgrounds, with captions.

"a red circle on a blue background" — generated deterministically from a seed, written in the
diffusers convention (PNG files and a `metadata.jsonl` with `file_name` and `text`) so that the
same loader reads it as a user's folder. The eight colours are the corners of the RGB cube,
so the colour of any pixel can be read back by its nearest palette entry: that is how the
benchmark scores whether a generated shape has the colour its prompt asked for.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30), "green": (30, 190, 40), "blue": (30, 50, 225), "yellow": (235, 225, 35),
    "cyan": (35, 215, 225), "magenta": (215, 40, 200), "white": (240, 240, 240), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
WORDS = ("a", "on", "background", "photo", "of", "sks", *PALETTE, *SHAPES)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def draw(shape: str, colour: str, background: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image, drawn at 4x and downsampled so edges are smooth."""
    s = 4 * size
    img = Image.new("RGB", (s, s), PALETTE[background])
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.36) * s
    cx, cy = rng.uniform(r + 0.04 * s, s - r - 0.04 * s, size=2)
    fill = PALETTE[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img.resize((size, size), Image.LANCZOS)


def sample_specs(n: int, seed: int) -> list[tuple[str, str, str]]:
    """n (colour, shape, background) triples with colour != background, evenly covering pairs."""
    rng = np.random.default_rng(seed)
    colours = list(PALETTE)
    pairs = [(c, b) for c in colours for b in colours if c != b]
    specs = []
    for i in range(n):
        c, b = pairs[i % len(pairs)]
        specs.append((c, SHAPES[int(rng.integers(len(SHAPES)))], b))
    order = rng.permutation(n)
    return [specs[i] for i in order]


def generate(folder: Path, n: int = 2048, size: int = 32, seed: int = 0) -> Path:
    """Write the dataset to `folder` (atomically: a partial folder, then a rename)."""
    folder = Path(folder)
    if (folder / "metadata.jsonl").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for i, (colour, shape, background) in enumerate(sample_specs(n, seed)):
        name = f"{i:05d}.png"
        draw(shape, colour, background, size, rng).save(tmp / name)
        rows.append({"file_name": name, "text": caption(colour, shape, background)})
    (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def nearest_colours(image: np.ndarray) -> np.ndarray:
    """Palette index of every pixel of an (H, W, 3) uint8 image."""
    pal = np.asarray(list(PALETTE.values()), dtype=np.float32)
    d = ((image.reshape(-1, 1, 3).astype(np.float32) - pal[None]) ** 2).sum(-1)
    return d.argmin(-1).reshape(image.shape[:2])


def shape_colour(image: np.ndarray, background: str) -> str | None:
    """The most frequent palette colour of the image that is not the background."""
    names = list(PALETTE)
    counts = np.bincount(nearest_colours(image).ravel(), minlength=len(names))
    counts[names.index(background)] = 0
    if counts.sum() == 0:
        return None
    return names[int(counts.argmax())]


def eval_prompts() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) pair of distinct colours once, shapes taking turns."""
    colours = list(PALETTE)
    pairs = [(c, b) for c in colours for b in colours if c != b]
    return [(c, SHAPES[i % len(SHAPES)], b) for i, (c, b) in enumerate(pairs)]


def colour_accuracy(images: list[np.ndarray], specs: list[tuple[str, str, str]]) -> float:
    """Fraction of images whose shape has the colour its prompt asked for (chance: 1/7)."""
    hits = [shape_colour(img, background) == colour for img, (colour, _, background) in zip(images, specs)]
    return float(np.mean(hits))


CHANCE = 1 / (len(PALETTE) - 1)
