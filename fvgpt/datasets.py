"""CoOp's 11 base-to-new datasets by name, laid out as CoOp's DATASETS.md describes, and the checks that tell a
dataset folder from the folders people point at by mistake. Torch-free (fvgpt.config names the datasets with it).

`--dataset NAME --root ROOT` reads ROOT/<folder>/... exactly as CoOp's readers do (datasets/*.py in CoOp, which
FVG-PT, KgCoOp and PromptSRC reuse): the same split file, the same image folder the split's paths are relative to,
the same class names with CoOp's fixes, the same order of the training list (which decides the few-shot draw,
fvgpt.fewshot). ROOT is CoOp's `--root` (DATA, holding every dataset) or FVG-PT's (DATA/caltech-101, holding
caltech-101/ and the masks in mask/). docs/datasets.md.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

COOP_DATASETS_DOC = "CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp)"
SPLIT_GLOB = "split_zhou_*.json"
SPLIT_DIRS = ("train", "val", "test")
MASK_DIR = "mask"
FEWSHOT_CACHE_DIR = "split_fewshot"  # CoOp writes its few-shot pickles here: never read, but it marks a dataset folder


@dataclass
class Listing:
    """Every image a dataset lists, in the order its files list them, with 0-based labels."""

    classnames: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    image_dir: Path
    index_file: Path | None = None  # the file the lists come from: a split file, a list or a class-name file


@dataclass(frozen=True)
class CoopDataset:
    """One of CoOp's datasets: where its files are under ROOT/<folder> and how CoOp reads them."""

    name: str  # the --dataset value: CoOp's config name (configs/datasets/<name>.yaml)
    title: str  # CoOp's class name
    folder: str  # ROOT/<folder>
    images: str  # the folder the split's paths are relative to, inside ROOT/<folder> ("" = ROOT/<folder> itself)
    split: str | None  # CoOp's split file in ROOT/<folder>; None for the two datasets CoOp reads otherwise
    source: str  # where the missing piece comes from, for the error that asks for it
    renames: dict[str, str] = field(default_factory=dict)  # CoOp's class-name fixes (NEW_CNAMES)
    markers: tuple[str, ...] = ()  # names inside ROOT/<folder> that identify its layout besides the split file
    aliases: tuple[str, ...] = ()

    def read(self, folder: Path) -> Listing:
        return _READERS.get(self.name, _read_coop_split)(self, folder)

    def looks_like(self, folder: Path) -> bool:
        """True for a folder laid out as this dataset (its split file, its markers, or its name and image folder)."""
        if self.split and (folder / self.split).is_file():
            return True
        if self.markers and all((folder / m).exists() for m in self.markers):
            return True
        return folder.name == self.folder and (folder / self.images).is_dir() and bool(self.images)


# CoOp's class-name fixes (datasets/caltech101.py and eurosat.py), applied where CoOp builds its split files; applied
# here to every name read, so a split file written without them reads the same as CoOp's published ones.
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_RENAMES = {"AnnualCrop": "Annual Crop Land", "HerbaceousVegetation": "Herbaceous Vegetation Land",
                   "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
                   "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
                   "SeaLake": "Sea or Lake"}
_SPLIT_SOURCE = "download {split} (linked from " + COOP_DATASETS_DOC + ") into {folder}"

DATASETS: tuple[CoopDataset, ...] = (
    CoopDataset("imagenet", "ImageNet", "imagenet", "images", None,
                "put classnames.txt (linked from " + COOP_DATASETS_DOC + ") in {folder} and the train and val "
                "sets in {folder}/images/train and {folder}/images/val", markers=("classnames.txt", "images")),
    CoopDataset("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                _SPLIT_SOURCE, CALTECH_RENAMES, ("101_ObjectCategories",)),
    CoopDataset("oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json", _SPLIT_SOURCE,
                markers=("images", "annotations")),
    CoopDataset("stanford_cars", "StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json", _SPLIT_SOURCE,
                markers=("cars_train", "cars_test")),
    CoopDataset("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                _SPLIT_SOURCE, markers=("jpg", "imagelabels.mat"), aliases=("flowers102",)),
    CoopDataset("food101", "Food101", "food-101", "images", "split_zhou_Food101.json", _SPLIT_SOURCE,
                markers=("images", "meta")),
    CoopDataset("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", None,
                "keep data/ of fgvc-aircraft-2013b.tar.gz (images/, variants.txt, images_variant_*.txt) as {folder}",
                markers=("images", "variants.txt")),
    CoopDataset("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json", _SPLIT_SOURCE,
                markers=("SUN397",)),
    CoopDataset("dtd", "DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json",
                _SPLIT_SOURCE, markers=("images", "imdb")),
    CoopDataset("eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json", _SPLIT_SOURCE,
                EUROSAT_RENAMES, ("2750",)),
    CoopDataset("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", _SPLIT_SOURCE,
                markers=("UCF-101-midframes",)),
)
NAMES = tuple(d.name for d in DATASETS)


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


_BY_KEY = {_key(k): d for d in DATASETS for k in (d.name, d.title, d.folder, *d.aliases)}


def lookup(name: str) -> CoopDataset | None:
    """The dataset a --dataset value names: CoOp's config name, its class name or its folder, in any case."""
    return _BY_KEY.get(_key(name))


def find_dataset(name: str) -> CoopDataset:
    found = lookup(name)
    if found is None:
        raise DataError(f"unknown dataset {name!r}; --dataset takes one of {', '.join(NAMES)} (CoOp's names)")
    return found


def absolute(path: str | Path) -> Path:
    """~ expanded and made absolute without resolving symlinks (as CoOp's os.path.abspath): datasets are often
    linked into DATA, and the masks sit beside the link, not beside its target."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def dataset_folder(spec: CoopDataset, root: Path) -> Path:
    """ROOT/<folder>, or an error that says where --root should point instead."""
    if not root.is_dir():
        raise DataError(f"--root {root} does not exist or is not a folder; it is the folder that holds "
                        f"{spec.folder}/ (CoOp's DATA, or FVG-PT's per-dataset root)")
    folder = root / spec.folder
    if folder.is_dir() and spec.looks_like(folder):
        return folder
    # FVG-PT's per-dataset roots (DATA/sun-397/sun397, DATA/fgvc_aircraft/fgvc-aircraft-2013b/fgvc_aircraft)
    nested = next((c for c in [folder, *_subfolders(folder), *_subfolders(root)] if spec.looks_like(c / spec.folder)),
                  None)
    if nested is not None:
        raise DataError(f"{nested} holds {spec.folder}/ (FVG-PT's per-dataset layout, searched from {root}): "
                        f"pass --root {nested}")
    if spec.looks_like(root):
        raise DataError(f"{root} is the {spec.title} folder itself; --root is the folder that holds it: "
                        f"--root {root.parent}")
    if folder.is_dir():
        return folder  # its reader names what is missing inside
    raise DataError(f"no {spec.folder}/ in {root} (searched for {folder}); CoOp's layout is "
                    f"ROOT/{spec.folder}/{spec.images or '...'} ({COOP_DATASETS_DOC})")


def read_dataset(spec: CoopDataset, root: Path) -> Listing:
    listing = spec.read(dataset_folder(spec, root))
    listing.classnames = [spec.renames.get(n, n) for n in listing.classnames]
    return listing


# ---- readers ----------------------------------------------------------------------------------------------------

def _read_text(path: Path, what: str, fix: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path.parent} has no {path.name} ({what}): {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} exists but cannot be read ({exc.__class__.__name__}: {exc})") from None


def _need_dir(path: Path, fix: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path} does not exist or is not a folder: {fix}")
    return path


def read_split_file(split_file: Path, image_dir: Path | None, search: Path | None = None,
                    preferred: str | None = None) -> Listing:
    """A CoOp/Dassl split file: {"train"|"val"|"test": [[path relative to image_dir, label, class name], ...]}
    (OxfordPets.read_split). The class names come from the training entries first, as Dassl's get_lab2cname.
    Without `image_dir`, the folder the paths are relative to is looked for under `search` (`preferred` first)."""
    text = _read_text(split_file, "CoOp's split file", f"download it ({COOP_DATASETS_DOC})")
    try:
        split = json.loads(text)
        entries = {k: [(str(e[0]), int(e[1]), str(e[2])) for e in split[k]] for k in ("train", "test")}
    except json.JSONDecodeError as exc:
        raise DataError(f"{split_file} is not JSON ({exc}); download it again") from None
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise DataError(f"{split_file} is not a CoOp/Dassl split file (needs 'train' and 'test' lists of "
                        f"[path, label, class name]; {exc.__class__.__name__}: {exc})") from None
    if not entries["train"] or not entries["test"]:
        raise DataError(f"{split_file}: needs non-empty 'train' and 'test' lists")
    names: dict[int, str] = {}
    for rows in entries.values():
        for _, label, name in rows:
            names.setdefault(label, name)
    if sorted(names) != list(range(len(names))):
        raise DataError(f"{split_file}: labels must be 0..N-1, got {sorted(names)[:10]}...")
    if image_dir is None:
        image_dir = find_image_dir(search or split_file.parent, entries["train"][0][0], preferred)
    lists = {k: [(image_dir / rel, label) for rel, label, _ in rows] for k, rows in entries.items()}
    return Listing([names[i] for i in range(len(names))], lists["train"], lists["test"], image_dir, split_file)


def find_image_dir(root: Path, rel: str, preferred: str | None = None) -> Path:
    """The folder under root (root itself, a sub-folder or a sub-sub-folder) that holds the split's first path."""
    first = [root / preferred] if preferred is not None else []
    candidates = first + [root] + _subfolders(root)
    candidates += [g for c in candidates[len(first) + 1:] for g in _subfolders(c)]
    found = next((c for c in candidates if (c / rel).is_file()), None)
    if found is None:
        raise DataError(f"cannot find the image folder of {root}: no folder within two levels holds the split "
                        f"file's first entry {rel!r}; extract the images there or pass --image-dir")
    return found


def _read_coop_split(spec: CoopDataset, folder: Path) -> Listing:
    split_file = folder / spec.split
    if not split_file.exists():
        raise DataError(f"{folder} has no {spec.split} (searched {folder}); CoOp reads {spec.title} from its "
                        f"split file: {spec.source.format(split=spec.split, folder=folder)}")
    images = _need_dir(folder / spec.images, f"extract {spec.title}'s images there ({COOP_DATASETS_DOC})")
    return read_split_file(split_file, images)


def _listdir_nohidden(folder: Path) -> list[str]:
    """os.listdir order, hidden names dropped: Dassl's listdir_nohidden, which CoOp's ImageNet reader uses. The order
    is the file system's, so ImageNet draws match CoOp's on the same disk (docs/datasets.md)."""
    return [f for f in os.listdir(folder) if not f.startswith(".")]


def _read_imagenet(spec: CoopDataset, folder: Path) -> Listing:
    """datasets/imagenet.py: classnames.txt maps each wnid folder to its name; labels follow the sorted folders of
    each split; the val set is the test set."""
    classnames_file = folder / "classnames.txt"
    names: dict[str, str] = {}
    for line in _read_text(classnames_file, "wnid and class name per line",
                           spec.source.format(folder=folder)).splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name
    fix = spec.source.format(folder=folder)
    lists, wnids = {}, {}
    for part, split_dir in (("train", "train"), ("test", "val")):
        base = _need_dir(folder / spec.images / split_dir, fix)
        wnids[part] = sorted(e.name for e in os.scandir(base) if e.is_dir())
        lists[part] = [(base / wnid / f, label) for label, wnid in enumerate(wnids[part])
                       for f in _listdir_nohidden(base / wnid)]
    if wnids["train"] != wnids["test"]:
        odd = sorted(set(wnids["train"]) ^ set(wnids["test"]))
        raise DataError(f"{folder / spec.images}: train/ and val/ hold different class folders ({len(odd)} differ, "
                        f"e.g. {odd[:3]}); labels would not match")
    unknown = [w for w in wnids["train"] if w not in names]
    if unknown:
        raise DataError(f"{classnames_file} has no name for {len(unknown)} class folder(s) of "
                        f"{folder / spec.images / 'train'}, e.g. {unknown[:3]}")
    return Listing([names[w] for w in wnids["train"]], lists["train"], lists["test"], folder / spec.images,
                   classnames_file)


def _read_aircraft(spec: CoopDataset, folder: Path) -> Listing:
    """datasets/fgvc_aircraft.py: variants.txt gives the labels; images_variant_<split>.txt lists
    "<image id> <variant>" lines for images/<image id>.jpg."""
    fix = spec.source.format(folder=folder)
    classnames = [line.strip() for line in _read_text(folder / "variants.txt", "the class list", fix).splitlines()
                  if line.strip()]
    label = {c: i for i, c in enumerate(classnames)}
    images = _need_dir(folder / spec.images, fix)
    lists = {}
    for part in ("train", "test"):
        path = folder / f"images_variant_{part}.txt"
        rows = []
        for n, line in enumerate(_read_text(path, f"the {part} list", fix).splitlines(), 1):
            if not line.strip():
                continue
            image_id, *words = line.strip().split(" ")
            variant = " ".join(words)
            if variant not in label:
                raise DataError(f"{path}, line {n}: variant {variant!r} is not in {folder / 'variants.txt'}")
            rows.append((images / f"{image_id}.jpg", label[variant]))
        lists[part] = rows
    return Listing(classnames, lists["train"], lists["test"], images, folder / "images_variant_train.txt")


_READERS: dict[str, Callable[[CoopDataset, Path], Listing]] = {"imagenet": _read_imagenet,
                                                               "fgvc_aircraft": _read_aircraft}


# ---- what a --data folder is not --------------------------------------------------------------------------------

def dataset_for_split_file(split_file: Path) -> CoopDataset | None:
    return next((d for d in DATASETS if d.split == split_file.name), None)


def _identify(folder: Path) -> str | None:
    """What a folder is, if it is a dataset rather than a class: a CoOp dataset's name, or a Dassl split folder."""
    spec = next((d for d in DATASETS if d.looks_like(folder)), None)
    if spec is not None:
        return spec.name
    if next(folder.glob(SPLIT_GLOB), None) is not None:
        return "a Dassl split folder"
    return None


def _identify_nested(folder: Path) -> str | None:
    """FVG-PT's per-dataset root: the dataset's own folder one level down (DATA/caltech-101/caltech-101)."""
    inner = next((d for d in DATASETS if (folder / d.folder).is_dir() and d.looks_like(folder / d.folder)), None)
    return f"{inner.name}, in {inner.folder}/" if inner else None


def check_data_folder(root: Path, children: list[Path]) -> None:
    """Refuse a --data folder that is not one dataset: CoOp's DATA (datasets as sub-folders), FVG-PT's per-dataset
    root, a split folder (train/val/test) or a CoOp dataset folder without its split file. `children` are the
    sub-folders an ImageFolder reading would take as classes."""
    spec = next((d for d in DATASETS if d.looks_like(root)), None)
    if spec is not None:
        parent = f"--dataset {spec.name} --root {root.parent}"
        if spec.split is None:
            raise DataError(f"{root} is CoOp's {spec.title} folder, read by its own reader: use {parent}")
        raise DataError(f"{root} looks like CoOp's {spec.title} folder but has no {spec.split}: "
                        f"{spec.source.format(split=spec.split, folder=root)}, then use {parent} (or --data {root})")
    found = {c.name: kind for c in children if (kind := _identify(c) or _identify_nested(c))}
    if found:
        listed = ", ".join(f"{n}/ ({k})" for n, k in sorted(found.items()))
        first = min(found)
        raise DataError(f"{root} holds datasets, not class folders: {listed}. Train on one with "
                        f"--dataset NAME --root {root} (NAME: {', '.join(NAMES)}), or --data {root / first}")
    if any(c.name == FEWSHOT_CACHE_DIR for c in children):
        raise DataError(f"{root} holds {FEWSHOT_CACHE_DIR}/, CoOp's few-shot cache: it is a CoOp dataset folder, not "
                        f"classes. Use --dataset NAME --root {root.parent} (NAME: {', '.join(NAMES)}), or --data "
                        f"{root} once it holds its split file (split_zhou_*.json)")
    splits = sorted(c.name for c in children if c.name in SPLIT_DIRS)
    if splits:
        raise DataError(f"{root} holds split folders ({', '.join(splits)}), not class folders. --data reads "
                        f"ROOT/<class>/<image>, or ROOT/train/<class>/... with ROOT/test/<class>/... (a val/ is "
                        f"not a test split: rename it test/); CoOp's ImageNet: --dataset imagenet --root DATA")
    siblings = [s for s in SPLIT_DIRS if s != root.name and (root.parent / s).is_dir()]
    if root.name in SPLIT_DIRS and siblings:
        fix = (f"pass --data {root.parent}, whose train/ and test/ are read as the two splits"
               if {"train", "test"} <= {root.name, *siblings} else
               f"a --data folder holds train/ and test/ ({root.parent} has {', '.join([root.name, *siblings])}); "
               f"CoOp's ImageNet: --dataset imagenet --root DATA")
        raise DataError(f"{root} is the {root.name}/ split of {root.parent}, not a dataset: {fix}")


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []
