"""Foreground masks from U²-Net-p (real onnxruntime inference) and the bundled photos they are checked on."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvgpt.photos import ASSET_DIR, photo_paths
from fvgpt.data import load_mask, open_rgb
from fvgpt.masks import MaskError, SaliencyModel, default_model_path, encode_mask, fetch_u2netp, generate_masks


@pytest.fixture(scope="module")
def model() -> SaliencyModel:
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"U²-Net-p not found at {path}; fetch it first with `fvgpt masks --fetch-model`")
    return SaliencyModel(path, threads=4)


@pytest.fixture(scope="module")
def saliency(model: SaliencyModel) -> dict[str, np.ndarray]:
    """One prediction per bundled photo, shared by the tests (inference is the slow part)."""
    return {p.name: model.predict(open_rgb(p)) for p in photo_paths()}


def test_photo_paths_are_four_readable_rgb_images():
    paths = photo_paths()
    assert [p.name for p in paths] == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    for p in paths:
        assert p.parent == ASSET_DIR
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) == 320


def test_saliency_is_a_plausible_foreground(saliency: dict[str, np.ndarray]):
    for name, sal in saliency.items():
        with Image.open(ASSET_DIR / name) as im:
            assert sal.shape == (im.height, im.width)
        assert sal.dtype == np.float32 and sal.min() >= 0.0 and sal.max() <= 1.0
        assert 0.01 < (sal > 0.5).mean() < 0.95, name
    ys, xs = np.nonzero(saliency["chelsea.jpg"] > 0.5)
    h, w = saliency["chelsea.jpg"].shape
    assert 0.2 < xs.mean() / w < 0.8 and 0.2 < ys.mean() / h < 0.8  # the cat sits in the middle 60%


def test_generate_masks_writes_fvgpt_layout_and_resumes(tmp_path: Path, model: SaliencyModel,
                                                        saliency: dict[str, np.ndarray]):
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    (root / "rocket").mkdir()
    shutil.copy(ASSET_DIR / "chelsea.jpg", root / "cat" / "a.jpg")
    shutil.copy(ASSET_DIR / "rocket.jpg", root / "rocket" / "b.jpg")
    (root / "cat" / "bad.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg" * 20)

    report = generate_masks(root, model, progress=False)
    assert (report.written, report.existing, report.failed) == (2, 0, [str(root / "cat" / "bad.jpg")])
    masks = {"chelsea.jpg": root / "mask" / "cat" / "a.jpg", "rocket.jpg": root / "mask" / "rocket" / "b.jpg"}
    assert sorted(p for p in (root / "mask").rglob("*") if p.is_file()) == sorted(masks.values())
    for name, mask in masks.items():
        with Image.open(mask) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (saliency[name].shape[1], saliency[name].shape[0])
        np.testing.assert_array_equal(load_mask(mask, im.size), (saliency[name] > 0.5).astype(np.uint8))

    mtimes = {m: m.stat().st_mtime_ns for m in masks.values()}
    again = generate_masks(root, model, progress=False)
    assert (again.written, again.existing, again.failed) == (0, 2, report.failed)
    assert {m: m.stat().st_mtime_ns for m in masks.values()} == mtimes


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_encoded_masks_read_back_exactly(tmp_path: Path, saliency: dict[str, np.ndarray], suffix: str):
    """Lossy JPEG (q95) must not move any pixel across load_mask's threshold."""
    for name, sal in saliency.items():
        fg = sal > 0.5
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(encode_mask(fg, suffix))
        np.testing.assert_array_equal(load_mask(path, (fg.shape[1], fg.shape[0])), fg, err_msg=name)


@pytest.mark.parametrize("content", [None, b"", b"not an onnx model at all" * 50])
def test_bad_model_path_raises_mask_error(tmp_path: Path, content: bytes | None):
    path = tmp_path / "u2netp.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MaskError, match=re.escape(str(path))):
        SaliencyModel(path)


def test_fetch_is_a_no_op_when_the_model_is_present(model: SaliencyModel):
    before = model.path.stat().st_mtime_ns
    assert fetch_u2netp(model.path) == model.path
    assert model.path.stat().st_mtime_ns == before
