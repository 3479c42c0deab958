"""The embedded default dataset: generated images of coloured shapes on cluttered backgrounds, with exact masks.

Written in the FVG-PT layout (ROOT/<class>/<i>.jpg and ROOT/mask/<class>/<i>.jpg, white foreground on black), so
it exercises the same loader as real data. The clutter uses the other classes' colours, so the class is decided by
the foreground object, which is what the foreground view is for.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from .data import MASK_DIR

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle", "cross")
DEFAULT_CLASSES = ["red circle", "green square", "blue triangle", "yellow cross", "purple circle",
                   "red square", "green triangle", "blue cross", "yellow circle", "purple square"]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        w = (x1 - x0) // 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
        draw.rectangle((x0, y0 + w, x1, y1 - w), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(label: str, rng: random.Random, size: int = 96) -> tuple[Image.Image, Image.Image]:
    """One (image, mask) pair for a "<colour> <shape>" label."""
    colour, shape = label.split()
    bg = tuple(rng.randint(90, 200) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(4, 8)):  # clutter: small blobs in any class colour
        r = rng.randint(3, size // 10)
        cx, cy = rng.randint(0, size), rng.randint(0, size)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rng.choice(list(COLOURS.values())))
    extent = rng.randint(size // 3, size // 2)
    x0, y0 = rng.randint(4, size - extent - 4), rng.randint(4, size - extent - 4)
    box = (x0, y0, x0 + extent, y0 + extent)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    _draw_shape(draw, shape, box, jitter)
    mask = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, box, 255)
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img, mask.convert("RGB")


def make_demo_dataset(root: str | Path, per_class: int = 30, classes: list[str] | None = None, seed: int = 0,
                      size: int = 96) -> Path:
    """Write the dataset (idempotent for the same arguments) and return its root."""
    root = Path(root)
    rng = random.Random(seed)
    for label in classes or DEFAULT_CLASSES:
        folder = label.replace(" ", "_")
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / MASK_DIR / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img, mask = render(label, rng, size)
            img.save(root / folder / f"{i:04d}.jpg", quality=92)
            mask.save(root / MASK_DIR / folder / f"{i:04d}.jpg", quality=95)
    return root
