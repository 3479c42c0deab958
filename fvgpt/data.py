"""Datasets: the layouts FVG-PT users already have, the K-shot draw, masks, and paired augmentation.

Layouts (read unchanged):
  coop         --dataset NAME --root ROOT: one of CoOp's 11 datasets in ROOT/<its folder> (fvgpt.datasets)
  dassl        --data ROOT with ROOT/split_zhou_*.json: {"train"|"val"|"test": [[relative path, label, class name]]}
  imagefolder  --data ROOT: ROOT/<class>/<image>, or ROOT/train/<class>/<image> with ROOT/test/<class>/<image>
  masks        MASK_ROOT/mask/<image path relative to MASK_ROOT>, white foreground on black (FVG-PT's
               DatasetWrapperFGPT), where MASK_ROOT is the dataset folder or its parent (FVG-PT's --root).
Every path is made absolute once, here, so masks are found and run dirs work from any directory. The K-shot draw is
CoOp's (fvgpt.fewshot); docs/datasets.md.
"""
from __future__ import annotations

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

from .datasets import (MASK_DIR, SPLIT_GLOB, Listing, absolute, check_data_folder, dataset_for_split_file, find_dataset,
                       read_dataset, read_split_file)
from .errors import DataError
from .fewshot import dassl_fewshot
from .preprocess import Preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    mask: Path | None = None


@dataclass
class DatasetIndex:
    root: Path  # the dataset's folder (--data, or ROOT/<folder> of a named dataset)
    layout: str  # coop | dassl | imagefolder
    classnames: list[str]
    train: list[Sample]  # the K-shot draw (empty when the index was loaded for evaluation only)
    test: list[Sample]
    mask_root: Path | None
    warnings: list[str] = field(default_factory=list)
    dataset: str | None = None  # CoOp's name of a named dataset
    index_file: Path | None = None  # the split file (or list) the images come from
    image_dir: Path | None = None  # the folder the index file's paths are relative to

    def describe(self) -> dict:
        """What data.json records about where the data came from (absolute paths)."""
        return {"layout": self.layout, "dataset": self.dataset, "root": str(self.root),
                "index_file": str(self.index_file) if self.index_file else None,
                "image_dir": str(self.image_dir) if self.image_dir else None,
                "mask_root": str(self.mask_root) if self.mask_root else None}


def mask_path_for(image: Path, mask_root: Path) -> Path:
    """ROOT/a/b/c.jpg -> ROOT/mask/a/b/c.jpg (FVG-PT DatasetWrapperFGPT._get_mask_path)."""
    return mask_root / MASK_DIR / image.relative_to(mask_root)


def find_mask_root(folder: Path) -> Path | None:
    """The dataset folder or its parent, whichever holds mask/ first (FVG-PT puts it in its --root, the parent)."""
    for candidate in (folder, folder.parent):
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


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(d for d in folder.iterdir() if d.is_dir() and d.name != MASK_DIR and not d.name.startswith("."))
    except OSError as exc:
        raise DataError(f"cannot read the folder {folder} ({exc.__class__.__name__}: {exc})") from None


def _imagefolder(root: Path, test_fraction: float, split_seed: int) -> Listing:
    split_dirs = {d for d in ("train", "test") if (root / d).is_dir()}
    tops = [root / "train", root / "test"] if split_dirs == {"train", "test"} else [root]
    class_dirs = [c for top in tops for c in _subfolders(top)]
    check_data_folder(root, class_dirs if len(tops) == 1 else [])
    classes = sorted({c.name for c in class_dirs})
    if not classes:
        raise DataError(f"{root}: no class folders found (expected ROOT/<class>/<image> or ROOT/train/<class>/... "
                        f"with ROOT/test/<class>/...; or --dataset NAME --root DATA for CoOp's datasets)")
    label = {c: i for i, c in enumerate(classes)}
    lists = [[(p, label[c.name]) for c in _subfolders(top) for p in _images_under(c)] for top in tops]
    if len(lists) == 2:
        return Listing(classes, lists[0], lists[1], root)
    # flat: hold out a fixed per-class test part, independent of the training seed
    per_class: dict[int, list[Path]] = defaultdict(list)
    for p, lab in lists[0]:
        per_class[lab].append(p)
    rng = random.Random(split_seed)
    train, test = [], []
    for lab, paths in sorted(per_class.items()):
        rng.shuffle(paths)
        n_test = max(1, round(len(paths) * test_fraction)) if len(paths) > 1 else 0
        test += [(p, lab) for p in paths[:n_test]]
        train += [(p, lab) for p in paths[n_test:]]
    return Listing(classes, train, test, root)


def _read_folder(root: Path, split_file: Path | None, image_dir: Path | None, test_fraction: float,
                 split_seed: int) -> tuple[Listing, str]:
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a dataset folder")
    if image_dir is not None and not image_dir.is_dir():
        raise DataError(f"--image-dir {image_dir} does not exist or is not a folder")
    if split_file is None:
        split_file = next(iter(sorted(root.glob(SPLIT_GLOB))), None)
    if split_file is None:
        if image_dir is not None:
            raise DataError(f"--image-dir goes with a split file, and {root} has no {SPLIT_GLOB}")
        return _imagefolder(root, test_fraction, split_seed), "imagefolder"
    spec = dataset_for_split_file(split_file)
    listing = read_split_file(split_file, image_dir, root, spec.images if spec else None)
    if spec is not None:
        listing.classnames = [spec.renames.get(n, n) for n in listing.classnames]
    return listing, "dassl"


def _problem(path: Path) -> str | None:
    """None for a readable image, else "missing" or "unreadable"."""
    if not path.is_file():
        return "missing"
    try:
        open_rgb(path)
        return None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return "unreadable"


def k_shot(pool: list[tuple[Path, int]], shots: int, seed: int,
           classnames: list[str]) -> tuple[list[tuple[Path, int]], list[str]]:
    """CoOp's K-shot draw (fvgpt.fewshot) over the training list in its own order. A drawn image that is missing or
    unreadable (CoOp would stop) is replaced by the next unused image of its class in list order and reported."""
    drawn = dassl_fewshot([lab for _, lab in pool], shots, seed)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i in drawn:
        by_class[pool[i][1]].append(i)
    used = set(drawn)
    chosen, problems, short = [], {"missing": 0, "unreadable": 0}, []
    for lab, positions in by_class.items():
        spares = (i for i, (_, other) in enumerate(pool) if other == lab and i not in used)
        picked = 0
        for i in positions:
            while i is not None and (problem := _problem(pool[i][0])) is not None:
                problems[problem] += 1
                i = next(spares, None)
            if i is not None:
                chosen.append(pool[i])
                picked += 1
        if picked < shots:
            short.append(f"{classnames[lab]} ({picked})")
    short += [f"{classnames[lab]} (0)" for lab in range(len(classnames)) if lab not in by_class]
    notes = []
    if short:
        notes.append(f"{len(short)} class(es) have fewer than {shots} usable training images and train on what they "
                     f"have, as CoOp does: {', '.join(short[:8])}{', ...' if len(short) > 8 else ''}")
    if problems["missing"] or problems["unreadable"]:
        notes.append(f"skipped {problems['missing']} missing and {problems['unreadable']} unreadable training "
                     f"image(s) of the draw, each replaced by the next image of its class in list order")
    return chosen, notes


def _present(pairs: list[tuple[Path, int]], listing: Listing, notes: list[str]) -> list[tuple[Path, int]]:
    """The test images that exist; the missing ones are reported (not an error: evaluation counts what it reads)."""
    present = [(p, lab) for p, lab in pairs if p.is_file()]
    if len(present) < len(pairs):
        first = next(p for p, _ in pairs if not p.is_file())
        notes.append(f"{len(pairs) - len(present)} of {len(pairs)} test images listed in {listing.index_file} are "
                     f"missing under {listing.image_dir} (e.g. {first}); evaluation leaves them out")
    return present


def _check_image_dir(listing: Listing, given: bool) -> None:
    """A split file whose images are not where its paths point: name the folder searched and the fix."""
    sample = listing.train[:20]
    if sample and not any(p.is_file() for p, _ in sample):
        fix = "is --image-dir right?" if given else "extract the images there, or pass --image-dir"
        raise DataError(f"the images listed in {listing.index_file} are not under {listing.image_dir} (searched for "
                        f"{sample[0][0]} and {len(sample) - 1} more): {fix}")


def load_index(root: str | Path, shots: int, seed: int, split_file: str | Path | None = None,
               image_dir: str | Path | None = None, test_fraction: float = 0.3, split_seed: int = 0,
               dataset: str | None = None, draw: bool = True) -> DatasetIndex:
    """Index a dataset, draw the K-shot training set (unless `draw` is False: evaluation needs the test split only)
    and attach mask paths. `root` is the --data folder or, with `dataset`, the folder holding that dataset (--root)."""
    root = absolute(root)
    if dataset:
        if split_file or image_dir:
            raise DataError("--split-file and --image-dir go with --data; a --dataset knows its files")
        spec = find_dataset(dataset)
        listing, layout, folder = read_dataset(spec, root), "coop", root / spec.folder
    else:
        listing, layout = _read_folder(root, absolute(split_file) if split_file else None,
                                       absolute(image_dir) if image_dir else None, test_fraction, split_seed)
        folder = root
    if not listing.train:
        raise DataError(f"{root}: no training images found")
    _check_image_dir(listing, image_dir is not None)
    notes: list[str] = []
    test = _present(listing.test, listing, notes) if listing.index_file else listing.test
    train = []
    if draw:
        train, drawn_notes = k_shot(listing.train, shots, seed, listing.classnames)
        notes += drawn_notes
        if not train:
            raise DataError(f"{root}: none of the training images could be read")
    mask_root = find_mask_root(folder)

    def attach(pairs: list[tuple[Path, int]]) -> list[Sample]:
        out = []
        for p, lab in pairs:
            m = mask_path_for(p, mask_root) if mask_root and p.is_relative_to(mask_root) else None
            out.append(Sample(p, lab, m if m is not None and m.is_file() else None))
        return out

    index = DatasetIndex(folder, layout, listing.classnames, attach(train), attach(test), mask_root, notes,
                         dataset and find_dataset(dataset).name, listing.index_file,
                         listing.image_dir if listing.index_file else None)
    missing = sum(s.mask is None for s in index.train)
    if missing:
        searched = f"{mask_root / MASK_DIR}" if mask_root else f"{folder / MASK_DIR} or {folder.parent / MASK_DIR}"
        index.warnings.append(f"{missing} of {len(index.train)} training images have no mask in {searched}: they "
                              f"train without a foreground view (r := 0)")
    for note in index.warnings:
        warnings.warn(note, stacklevel=2)
    return index


def index_for(cfg, draw: bool = True) -> DatasetIndex:
    """The dataset a TrainConfig names (fvgpt.config): --data FOLDER, or --dataset NAME --root ROOT."""
    return load_index(cfg.root if cfg.dataset else cfg.data, cfg.shots, cfg.seed, cfg.split_file, cfg.image_dir,
                      cfg.test_fraction, dataset=cfg.dataset, draw=draw)


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
