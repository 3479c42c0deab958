"""Datasets: the three layouts FVG-PT users already have, K-shot sampling, masks, and paired augmentation.

Layouts (read unchanged):
  imagefolder  ROOT/<class>/<image>, or ROOT/{train,val,test}/<class>/<image>
  dassl        ROOT/split_zhou_*.json with {"train"|"val"|"test": [[relative path, label, class name], ...]}
  masks        MASK_ROOT/mask/<image path relative to MASK_ROOT>, white foreground on black (the FVG-PT release),
               where MASK_ROOT is ROOT or its parent (Dassl puts masks beside the dataset folder).
"""
from __future__ import annotations

import json
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2

from .errors import FVGPTError
from .preprocess import Preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MASK_DIR = "mask"
SPLIT_DIRS = ("train", "val", "test")


class DataError(FVGPTError):
    pass


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    mask: Path | None = None


@dataclass
class DatasetIndex:
    root: Path
    layout: str
    classnames: list[str]
    train: list[Sample]
    test: list[Sample]
    mask_root: Path | None
    warnings: list[str] = field(default_factory=list)


def mask_path_for(image: Path, mask_root: Path) -> Path:
    """ROOT/a/b/c.jpg -> ROOT/mask/a/b/c.jpg (FVG-PT DatasetWrapperFGPT._get_mask_path)."""
    return mask_root / MASK_DIR / image.relative_to(mask_root)


def find_mask_root(root: Path) -> Path | None:
    for candidate in (root, root.parent):
        if (candidate / MASK_DIR).is_dir():
            return candidate
    return None


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Binary {0,1} uint8 mask (H, W): mean over RGB of the [0,1] image > 0.5, NEAREST-resized to `size` (W, H)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != size:
            im = im.resize(size, Image.NEAREST)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return (arr.mean(axis=2) > 0.5).astype(np.uint8)


def open_rgb(path: Path) -> Image.Image:
    """Fully decode an image as RGB; raises OSError/UnidentifiedImageError on corrupt or truncated files."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _imagefolder(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    split_dirs = [d for d in SPLIT_DIRS if (root / d).is_dir()]
    tops = [root / d for d in split_dirs] if {"train", "test"} <= set(split_dirs) else [root]
    classes = sorted({d.name for top in tops for d in top.iterdir()
                      if d.is_dir() and d.name != MASK_DIR and not d.name.startswith(".")})
    if not classes:
        raise DataError(f"{root}: no class folders found (expected ROOT/<class>/<image> or ROOT/train/<class>/...)")
    label = {c: i for i, c in enumerate(classes)}
    items: dict[str, list[tuple[Path, int]]] = {}
    for top, name in zip(tops, split_dirs if len(tops) > 1 else ["all"]):
        items[name] = [(p, label[c.name]) for c in sorted(top.iterdir()) if c.name in label for p in _images_under(c)]
    return classes, items


def _find_image_dir(root: Path, rel: str) -> Path:
    candidates = [root] + sorted(d for d in root.iterdir() if d.is_dir() and d.name != MASK_DIR)
    candidates += sorted(d2 for d in candidates[1:] for d2 in d.iterdir() if d2.is_dir())
    for c in candidates:
        if (c / rel).is_file():
            return c
    raise DataError(f"{root}: cannot find the image folder for split entries like {rel!r}; pass --image-dir")


def _dassl(root: Path, split_file: Path, image_dir: Path | None) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    try:
        split = json.loads(split_file.read_text())
        entries = {k: [(str(e[0]), int(e[1]), str(e[2])) for e in split[k]] for k in ("train", "test") if k in split}
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise DataError(f"{split_file}: not a CoOp/Dassl split file ({exc})") from exc
    if not entries.get("train") or not entries.get("test"):
        raise DataError(f"{split_file}: needs non-empty 'train' and 'test' lists")
    names: dict[int, str] = {}
    for rows in entries.values():
        for _, lab, name in rows:
            names.setdefault(lab, name)
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{split_file}: labels must be 0..N-1, got {sorted(names)[:10]}...")
    base = image_dir or _find_image_dir(root, entries["train"][0][0])
    items = {k: [(base / rel, lab) for rel, lab, _ in rows] for k, rows in entries.items()}
    return [names[i] for i in range(len(names))], items


def _readable(path: Path) -> bool:
    try:
        open_rgb(path)
        return True
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False


def k_shot(pool: list[tuple[Path, int]], shots: int, seed: int,
           n_classes: int) -> tuple[list[tuple[Path, int]], list[str]]:
    """Deterministic K images per class (sorted pool, seeded shuffle); unreadable files are skipped and replaced."""
    by_class: dict[int, list[Path]] = defaultdict(list)
    for p, lab in sorted(pool):
        by_class[lab].append(p)
    rng = random.Random(seed)
    chosen, notes, skipped = [], [], 0
    for lab in range(n_classes):
        paths = by_class.get(lab, [])
        rng.shuffle(paths)
        picked = []
        for p in paths:
            if len(picked) == shots:
                break
            if _readable(p):
                picked.append(p)
            else:
                skipped += 1
        if len(picked) < shots:
            notes.append(f"class {lab} has {len(picked)} usable training images, fewer than {shots} shots")
        chosen += [(p, lab) for p in picked]
    if skipped:
        notes.append(f"skipped {skipped} unreadable training image(s)")
    return chosen, notes


def load_index(root: str | Path, shots: int, seed: int, split_file: str | Path | None = None,
               image_dir: str | Path | None = None, test_fraction: float = 0.3, split_seed: int = 0) -> DatasetIndex:
    """Index a dataset in any supported layout, draw the K-shot training set and attach mask paths."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    if split_file is None:
        found = sorted(root.glob("split_zhou_*.json"))
        split_file = found[0] if found else None
    if split_file is not None:
        layout = "dassl"
        classes, items = _dassl(root, Path(split_file), Path(image_dir) if image_dir else None)
    else:
        layout = "imagefolder"
        classes, items = _imagefolder(root)
    if "all" in items:  # flat ImageFolder: hold out a fixed per-class test part, independent of the training seed
        per_class: dict[int, list[Path]] = defaultdict(list)
        for p, lab in items.pop("all"):
            per_class[lab].append(p)
        rng = random.Random(split_seed)
        items["train"], items["test"] = [], []
        for lab, paths in sorted(per_class.items()):
            rng.shuffle(paths)
            n_test = max(1, round(len(paths) * test_fraction)) if len(paths) > 1 else 0
            items["test"] += [(p, lab) for p in paths[:n_test]]
            items["train"] += [(p, lab) for p in paths[n_test:]]
    if not items.get("train"):
        raise DataError(f"{root}: no training images found")
    train, notes = k_shot(items["train"], shots, seed, len(classes))
    if not train:
        raise DataError(f"{root}: none of the training images could be read")
    mask_root = find_mask_root(root)

    def attach(pairs: list[tuple[Path, int]]) -> list[Sample]:
        out = []
        for p, lab in pairs:
            m = mask_path_for(p, mask_root) if mask_root and p.is_relative_to(mask_root) else None
            out.append(Sample(p, lab, m if m is not None and m.is_file() else None))
        return out

    index = DatasetIndex(root, layout, classes, attach(train), attach(items.get("test", [])), mask_root, notes)
    missing = sum(s.mask is None for s in index.train)
    if missing:
        index.warnings.append(f"{missing} of {len(index.train)} training images have no mask: they train without a "
                              f"foreground view (r := 0)")
    for note in index.warnings:
        warnings.warn(note, stacklevel=2)
    return index


# ---- transforms -----------------------------------------------------------------------------------------------

def train_transform(pre: Preprocess, augment: bool, crop_scale: float = 0.08) -> v2.Compose:
    """Paired transform for (image, mask): geometric steps share their random parameters (v2 applies one draw to
    every input) and masks are resampled NEAREST; ToDtype/Normalize touch the image only."""
    interp = v2.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    geometric = ([v2.RandomResizedCrop(pre.size, scale=(crop_scale, 1.0), interpolation=interp),
                  v2.RandomHorizontalFlip()]
                 if augment else eval_geometry(pre))
    return v2.Compose([v2.ToImage(), *geometric,
                       v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
                       v2.Normalize(pre.mean, pre.std)])


def eval_geometry(pre: Preprocess) -> list:
    interp = v2.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
    if pre.resize_mode == "squash":
        return [v2.Resize((pre.size, pre.size), interpolation=interp)]
    return [v2.Resize(pre.size, interpolation=interp), v2.CenterCrop(pre.size)]


def foreground_view(images: torch.Tensor, masks: torch.Tensor, pre: Preprocess, fill: str = "mean") -> torch.Tensor:
    """x_fg = x ⊙ m with the background set to the CLIP mean colour (0 after normalisation, the default) or to
    pixel black ("black": (0 − mean)/std); docs/method.md, "The foreground view"."""
    m = masks.to(images.dtype)
    if fill == "mean":
        return images * m
    if fill != "black":
        raise ValueError(f"unknown foreground fill {fill!r} (mean|black)")
    mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
                 for v in (pre.mean, pre.std))
    return images * m - mean / std * (1 - m)


class FewShotDataset(torch.utils.data.Dataset):
    """Yields dicts {"img", "mask" (1,H,W), "has_mask", "label"}; unreadable files yield None (dropped by collate).

    Training: `paired` maps (PIL image, Mask) to tensors with shared geometry. Evaluation: `image_transform` is
    open_clip's own preprocess and `paired` only carries the mask through the same resize/crop geometry.
    """

    def __init__(self, samples: list[Sample], paired, image_transform=None):
        self.samples = samples
        self.paired = paired
        self.image_transform = image_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict | None:
        s = self.samples[i]
        try:
            img = open_rgb(s.path)
            mask = load_mask(s.mask, img.size) if s.mask is not None else np.ones((img.height, img.width), np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            return None
        mask = tv_tensors.Mask(torch.from_numpy(mask)[None])
        if self.image_transform is None:
            image, mask = self.paired(img, mask)
        else:
            image, mask = self.image_transform(img), self.paired(mask)
        return {"img": image, "mask": mask.float(), "has_mask": s.mask is not None, "label": s.label}


def collate(batch: list[dict | None]) -> dict:
    """Default collation of the readable items, plus "dropped": how many were unreadable (only that key if all)."""
    items = [b for b in batch if b is not None]
    out = torch.utils.data.default_collate(items) if items else {}
    out["dropped"] = len(batch) - len(items)
    return out
