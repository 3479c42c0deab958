"""A small fixture dataset for tests and the export's parity set: "<colour> <shape>" classes (solid objects of the
generated world, fvgpt.world) on the world's scenes, with exact masks.

Written as a flat ImageFolder in the FVG-PT layout (ROOT/<class>/<i>.jpg and ROOT/mask/<class>/<i>.jpg, white
foreground on black), so it exercises the same loader as real data. The few-shot tasks of the world itself, with
scenes that correlate with the class, are fvgpt.world.make_task.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from .data import MASK_DIR
from .world import SCENES, ObjectKind
from .world import render as render_world

DEFAULT_CLASSES = ["red circle", "green square", "blue triangle", "yellow cross", "purple circle",
                   "red square", "green triangle", "blue cross", "yellow circle", "purple square"]


def render(label: str, rng: random.Random, size: int = 96) -> tuple[Image.Image, Image.Image]:
    """One (image, mask) pair for a "<colour> <shape>" label, on a random scene."""
    colour, shape = label.split()
    image, mask = render_world(ObjectKind(shape, colour, "solid"), rng.choice(SCENES), size, (rng.getrandbits(32),))
    return Image.fromarray(image), Image.fromarray(mask.astype("uint8") * 255).convert("RGB")


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
