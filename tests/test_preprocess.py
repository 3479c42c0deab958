"""The serving preprocessing (fvgpt_runtime.preprocess, PIL + NumPy) is open_clip's evaluation transform, to 1e-6.

The open_clip transform is built from the bundle manifest's preprocess block, so the test also checks that the
manifest describes what open_clip does; variants of the block (ViT-B's 224 px, squash, bilinear) widen the net.

Images that are not RGB are made RGB first, as training does (fvgpt/data.py converts at load). open_clip's transform
converts last, after resizing in the source mode, which for palette images means a nearest-neighbour resize (max
|Δ| ≈ 1.2) and for CMYK a resize in CMYK space (≈ 0.015); those modes are compared after the conversion.
"""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
from PIL import Image

from fvgpt.photos import photo_paths
from fvgpt.preprocess import Preprocess
from fvgpt_runtime.manifest import Manifest
from fvgpt_runtime.preprocess import preprocess, to_rgb

TOLERANCE = 1e-6


def open_clip_transform(block: dict):
    return open_clip.image_transform(block["size"], is_train=False, mean=tuple(block["mean"]), std=tuple(block["std"]),
                                     resize_mode=block["resize_mode"], interpolation=block["interpolation"])


def images() -> dict[str, Image.Image]:
    photos = {p.stem: Image.open(p).convert("RGB") for p in photo_paths()}
    cat = photos["chelsea"]
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:2400, 0:3600]
    smooth = np.stack([(x * 255 // 3599), (y * 255 // 2399), ((x + y) % 256)], -1).astype(np.uint8)
    return photos | {
        "tall crop": cat.crop((40, 0, 140, 213)),  # 100×213
        "odd size": cat.resize((301, 199), Image.BICUBIC),  # centre-crop rounding on both axes
        "tiny 1x1": Image.new("RGB", (1, 1), (250, 10, 128)),
        "tiny 3x5": Image.fromarray(rng.integers(0, 256, (5, 3, 3), dtype=np.uint8)),
        "tiny 7x2": Image.fromarray(rng.integers(0, 256, (2, 7, 3), dtype=np.uint8)),
        "exactly the size": cat.resize((64, 64)),
        "large 3600x2400": Image.fromarray(smooth),
        "large upscaled photo": photos["astronaut"].resize((2048, 2048), Image.BICUBIC),
    }


def other_modes() -> dict[str, Image.Image]:
    cat = Image.open(photo_paths()[1])
    rgba = cat.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(cat.size))
    gray16 = Image.fromarray((np.asarray(cat.convert("L"), np.uint16) * 257).astype(np.uint16))
    return {"grayscale": cat.convert("L"), "RGBA": rgba, "palette": cat.convert("P"), "CMYK": cat.convert("CMYK"),
            "16-bit": gray16}


@pytest.fixture(scope="module")
def manifest_block(tiny_bundle) -> dict:
    return Manifest.read(tiny_bundle).preprocess.to_dict()


VARIANTS = {"manifest": {}, "ViT-B 224": {"size": 224}, "squash": {"resize_mode": "squash"},
            "bilinear": {"interpolation": "bilinear"}}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_open_clip(manifest_block, variant):
    block = manifest_block | VARIANTS[variant]
    ours_cfg = Preprocess.from_dict(block)
    theirs = open_clip_transform(block)
    worst = {}
    for name, image in images().items():
        ours = preprocess(image, ours_cfg)
        ref = theirs(image).numpy()
        assert ours.shape == ref.shape == (3, block["size"], block["size"]) and ours.dtype == np.float32, name
        worst[name] = float(np.abs(ours - ref).max())
    assert max(worst.values()) <= TOLERANCE, {k: v for k, v in worst.items() if v > TOLERANCE}


@pytest.mark.parametrize("mode", list(other_modes()))
def test_other_modes_match_open_clip_after_rgb_conversion(manifest_block, mode):
    image = other_modes()[mode]
    ours = preprocess(image, Preprocess.from_dict(manifest_block))
    ref = open_clip_transform(manifest_block)(to_rgb(image)).numpy()
    assert float(np.abs(ours - ref).max()) <= TOLERANCE


def test_sixteen_bit_is_scaled_not_clipped():
    gray16 = other_modes()["16-bit"]
    assert np.array_equal(np.asarray(to_rgb(gray16))[..., 0], np.asarray(Image.open(photo_paths()[1]).convert("L")))
