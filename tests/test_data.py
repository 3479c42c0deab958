"""Dataset layouts (ImageFolder, Dassl split files, FVG-PT masks), K-shot sampling and bad-data handling."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from fvgpt.classes import ClassSplit, ClassSplitError
from fvgpt.data import DataError, FewShotDataset, collate, load_index, train_transform
from fvgpt.demo_data import make_demo_dataset

CLASSES = ["red circle", "green square", "blue triangle", "yellow cross"]


@pytest.fixture()
def folder(tmp_path):
    return make_demo_dataset(tmp_path / "ds", per_class=8, classes=CLASSES, size=48)


def test_imagefolder_flat_layout(folder):
    index = load_index(folder, shots=3, seed=1)
    assert index.layout == "imagefolder"
    assert index.classnames == sorted(c.replace(" ", "_") for c in CLASSES)  # "mask" is not a class
    assert len(index.train) == 3 * 4 and all(s.mask is not None and s.mask.is_file() for s in index.train)
    assert {s.path for s in index.train}.isdisjoint({s.path for s in index.test})
    assert all(s.mask == folder / "mask" / s.path.relative_to(folder) for s in index.train + index.test)


def test_k_shot_is_deterministic_by_seed(folder):
    a, b, c = (load_index(folder, shots=3, seed=s) for s in (1, 1, 2))
    assert [s.path for s in a.train] == [s.path for s in b.train]
    assert [s.path for s in a.train] != [s.path for s in c.train]
    assert [s.path for s in a.test] == [s.path for s in c.test]  # the test split does not move with the seed


def test_imagefolder_with_split_folders(tmp_path):
    src = make_demo_dataset(tmp_path / "src", per_class=6, classes=CLASSES[:2], size=40)
    root = tmp_path / "split"
    for part, idx in (("train", range(0, 4)), ("test", range(4, 6))):
        for cls in ("red_circle", "green_square"):
            (root / part / cls).mkdir(parents=True)
            for i in idx:
                shutil.copy(src / cls / f"{i:04d}.jpg", root / part / cls)
    index = load_index(root, shots=2, seed=0)
    assert index.classnames == ["green_square", "red_circle"]
    assert all("train" in s.path.parts for s in index.train) and len(index.test) == 4
    assert all("test" in s.path.parts for s in index.test)
    assert all(s.mask is None for s in index.train)  # this copy has no masks


def test_dassl_split_file_with_masks_beside_the_dataset(folder, tmp_path):
    """The CoOp/FVG-PT layout: DATA/caltech-101/<split file, images>, masks in DATA/mask/caltech-101/..."""
    data = tmp_path / "DATA"
    ds = data / "toy"
    shutil.copytree(folder, ds / "images", ignore=shutil.ignore_patterns("mask"))
    shutil.copytree(folder / "mask", data / "mask" / "toy" / "images")
    rows = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(sorted(CLASSES)):
        for i in range(8):
            rows["train" if i < 6 else "test"].append([f"{cls.replace(' ', '_')}/{i:04d}.jpg", label, cls])
    (ds / "split_zhou_Toy.json").write_text(json.dumps(rows))
    index = load_index(ds, shots=2, seed=3)
    assert index.layout == "dassl" and index.classnames == sorted(CLASSES)
    assert index.mask_root == data
    assert all(s.path.parent.parent == ds / "images" for s in index.train)
    assert all(s.mask == data / "mask" / "toy" / "images" / s.path.relative_to(ds / "images") for s in index.train)
    assert len(index.test) == 8


def test_bad_data_is_reported_not_fatal(folder):
    bad = folder / "red_circle" / "zz-corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    for p in sorted((folder / "blue_triangle").glob("*.jpg"))[2:]:  # leave 2 images: fewer than K = 4
        p.unlink()
    for p in (folder / "mask" / "green_square").glob("*.jpg"):  # images without masks
        p.unlink()
    with pytest.warns(UserWarning) as caught:
        index = load_index(folder, shots=4, seed=0, test_fraction=0.25)
    notes = " | ".join(str(w.message) for w in caught)
    assert "fewer than 4 usable training images" in notes and "no mask" in notes
    assert bad not in {s.path for s in index.train}
    assert sum(s.label == 0 for s in index.train) == 1  # blue_triangle: 2 images, 1 held out for test
    green = index.classnames.index("green_square")
    assert all(s.mask is None for s in index.train if s.label == green)
    # an unreadable test image is dropped by the loader and counted
    index.test.append(type(index.test[0])(bad, 0, None))
    ds = FewShotDataset(index.test[-3:], train_transform(load_preprocess(), augment=False))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["dropped"] == 1 and batch["img"].shape[0] == 2


def load_preprocess():
    from fvgpt.preprocess import Preprocess

    return Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bicubic",
                      resize_mode="shortest")


def test_missing_or_empty_dataset_stops_with_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_index(tmp_path / "nope", shots=1, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_index(tmp_path / "empty", shots=1, seed=0)
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no training images"):
        load_index(tmp_path / "hollow", shots=1, seed=0)


def test_base_new_split():
    names = ["a", "b", "c", "d", "e"]
    split = ClassSplit.paper(names)
    assert split.base == (True, True, True, False, False)  # the first ⌈5/2⌉ labels
    assert split.base_names == ["a", "b", "c"] and split.new_names == ["d", "e"]
    assert split.position == [0, 1, 2, 0, 1]
    assert ClassSplit.paper(names[:4], ["b", "d"]).base == (False, True, False, True)
    with pytest.raises(ClassSplitError, match="at least two classes"):
        ClassSplit.paper(["a"])
    with pytest.raises(ClassSplitError, match="unknown"):
        ClassSplit.paper(names, ["z"])
    assert split.head_for(["c", "a"]) == "base" and split.head_for(["a", "d"]) == "new"
    assert split.head_for(["a", "zebra"]) == "new" and split.head_for(None) == "new"


def test_training_batches_carry_masks_and_mask_flags(folder):
    index = load_index(folder, shots=2, seed=0)
    (index.train[0].mask).unlink()
    index = load_index(folder, shots=2, seed=0)
    ds = FewShotDataset(index.train, train_transform(load_preprocess(), augment=True))
    torch.manual_seed(0)
    random.seed(0)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["img"].shape == (8, 3, 32, 32) and batch["mask"].shape == (8, 1, 32, 32)
    assert batch["has_mask"].tolist().count(False) == 1
    no_mask = batch["mask"][~batch["has_mask"]]
    assert torch.equal(no_mask, torch.ones_like(no_mask))
