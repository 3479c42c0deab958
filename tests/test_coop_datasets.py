"""CoOp's 11 datasets rebuilt on tiny generated images, as CoOp's DATASETS.md lays them out, trained and evaluated
through `--dataset`; the K-shot draw and the base/new split checked against references written here from Dassl's and
CoOp's code (plain code, independent of fvgpt); and every refusal of a folder that is not what the user meant."""
from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from fvgpt.cli import main
from fvgpt.data import load_index
from fvgpt.errors import DataError
from fvgpt.fewshot import dassl_fewshot

TINY = ["--model", "fvgpt-tiny", "--pretrained", "none", "--epochs", "1", "--lr", "0.02", "--quiet"]
SHOTS, SEED = 2, 3


# ---- the references: Dassl's generate_fewshot_dataset and CoOp's subsample_classes, transcribed as plain code ----

def reference_fewshot(items: list[tuple[str, int]], num_shots: int, seed: int) -> list[tuple[str, int]]:
    """dassl DatasetBase.generate_fewshot_dataset right after dassl.utils.set_random_seed(seed) (CoOp's train.py),
    with the module-level `random` as Dassl uses it."""
    state = random.getstate()
    try:
        random.seed(seed)
        tracker = defaultdict(list)  # split_dataset_by_label
        for item in items:
            tracker[item[1]].append(item)
        dataset = []
        for _, group in tracker.items():
            dataset.extend(random.sample(group, num_shots) if len(group) >= num_shots else group)
        return dataset
    finally:
        random.setstate(state)


def reference_base_labels(few_shot_train: list[tuple[str, int]]) -> list[int]:
    """CoOp's OxfordPets.subsample_classes(subsample="base"): the first ceil(n/2) of the sorted labels present in the
    (few-shot) training list."""
    labels = sorted({label for _, label in few_shot_train})
    return labels[:math.ceil(len(labels) / 2)]


def reference_train_list(name: str, root: Path) -> list[tuple[str, int]]:
    """The training list CoOp's reader for `name` builds, in its order: the split file's "train" entries joined to the
    image folder (OxfordPets.read_split), FGVCAircraft's images_variant_train.txt, ImageNet's sorted wnid folders
    listed by os.listdir."""
    folder, images, split = LAYOUTS[name][:3]
    base = root / folder
    if name == "fgvc_aircraft":
        variants = (base / "variants.txt").read_text().splitlines()
        rows = [line.strip().split(" ") for line in (base / "images_variant_train.txt").read_text().splitlines()]
        return [(os.path.join(base, "images", r[0] + ".jpg"), variants.index(" ".join(r[1:]))) for r in rows]
    if name == "imagenet":
        train_dir = base / "images" / "train"
        wnids = sorted(f.name for f in os.scandir(train_dir) if f.is_dir())
        return [(os.path.join(train_dir, w, f), label) for label, w in enumerate(wnids)
                for f in os.listdir(train_dir / w) if not f.startswith(".")]
    entries = json.loads((base / split).read_text())["train"]
    return [(os.path.join(base / images, rel), int(label)) for rel, label, _ in entries]


# ---- the 11 layouts (CoOp's DATASETS.md), with the class names CoOp ends up with -----------------------------------

# name: (folder, image folder, split file, [(class in the split file or folder, expected class name), ...])
LAYOUTS = {
    "imagenet": ("imagenet", "images", None, [("n01440764", "tench"), ("n01443537", "goldfish"),
                                              ("n01484850", "great white shark"), ("n01491361", "tiger shark")]),
    "caltech101": ("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                   [("accordion", "accordion"), ("airplanes", "airplane"), ("Faces", "face"),
                    ("Leopards", "leopard")]),
    "oxford_pets": ("oxford_pets", "images", "split_zhou_OxfordPets.json",
                    [("abyssinian", "abyssinian"), ("american_bulldog", "american_bulldog"),
                     ("basset_hound", "basset_hound"), ("beagle", "beagle")]),
    "stanford_cars": ("stanford_cars", "", "split_zhou_StanfordCars.json",
                      [("2012 AM General Hummer SUV", "2012 AM General Hummer SUV"),
                       ("2012 Acura RL Sedan", "2012 Acura RL Sedan"), ("2012 Acura TL Sedan", "2012 Acura TL Sedan"),
                       ("2007 Acura TL Type-S", "2007 Acura TL Type-S")]),
    "oxford_flowers": ("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
                       [("pink primrose", "pink primrose"), ("hard-leaved pocket orchid", "hard-leaved pocket orchid"),
                        ("canterbury bells", "canterbury bells"), ("sweet pea", "sweet pea")]),
    "food101": ("food-101", "images", "split_zhou_Food101.json",
                [("apple_pie", "apple_pie"), ("baby_back_ribs", "baby_back_ribs"), ("baklava", "baklava"),
                 ("beef_carpaccio", "beef_carpaccio")]),
    "fgvc_aircraft": ("fgvc_aircraft", "images", None, [("707-320", "707-320"), ("727-200", "727-200"),
                                                        ("A300B4", "A300B4"), ("F/A-18", "F/A-18")]),
    "sun397": ("sun397", "SUN397", "split_zhou_SUN397.json",
               [("a/abbey", "abbey"), ("a/airplane_cabin", "airplane_cabin"),
                ("a/apartment_building/outdoor", "outdoor apartment_building"), ("b/bedroom", "bedroom")]),
    "dtd": ("dtd", "images", "split_zhou_DescribableTextures.json",
            [("banded", "banded"), ("blotchy", "blotchy"), ("braided", "braided"), ("bubbly", "bubbly")]),
    "eurosat": ("eurosat", "2750", "split_zhou_EuroSAT.json",
                [("AnnualCrop", "Annual Crop Land"), ("Forest", "Forest"),
                 ("HerbaceousVegetation", "Herbaceous Vegetation Land"), ("Highway", "Highway or Road")]),
    "ucf101": ("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
               [("Apply_Eye_Makeup", "Apply_Eye_Makeup"), ("Apply_Lipstick", "Apply_Lipstick"),
                ("Archery", "Archery"), ("Baby_Crawling", "Baby_Crawling")]),
}
TRAIN_PER_CLASS = (3, 3, 1, 3)  # class 2 has fewer than K = 2 training images: CoOp keeps what it has


def _rel(name: str, cls: str, part: str, n: int) -> str:
    """The n-th image's path inside the image folder, shaped as in the real dataset."""
    flat = {"oxford_pets": f"{cls.title()}_{n}.jpg", "oxford_flowers": f"image_{n:05d}.jpg",
            "stanford_cars": f"cars_{'test' if part == 'test' else 'train'}/{n:05d}.jpg",
            "fgvc_aircraft": f"{1000000 + n}.jpg",
            "imagenet": f"{'val' if part == 'test' else 'train'}/{cls}/{cls}_{n}.JPEG",
            "ucf101": f"{cls}/v_{cls.replace('_', '')}_g{n:02d}_c01.jpg"}
    return flat.get(name, f"{cls}/{cls.split('/')[-1]}_{n:04d}.jpg")


def build_layout(name: str, root: Path, masks_under: Path | None = None, seed: int = 0,
                 train_per_class: tuple[int, ...] = TRAIN_PER_CLASS) -> None:
    """ROOT/<folder> of dataset `name` with tiny images; masks (if asked) at MASKS/mask/<path relative to MASKS>."""
    folder, images, split, classes = LAYOUTS[name]
    base, rng = root / folder, random.Random(seed)
    rows: dict[str, list] = {"train": [], "val": [], "test": []}
    n = 0
    for label, (cls, display) in enumerate(classes):
        listed = cls if name in ("caltech101", "eurosat") else display  # two split files as CoOp writes them unfixed
        for part, count in (("train", train_per_class[label]), ("test", 1)):
            for _ in range(count):
                n += 1
                rel = _rel(name, cls, part, n)
                path = base / images / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24, 20), tuple(rng.randrange(256) for _ in range(3))).save(path)
                if masks_under is not None:
                    mask = masks_under / "mask" / path.relative_to(masks_under)
                    mask.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (24, 20), "white").save(mask, format="PNG")
                rows[part].append([rel, label, listed])
    rng.shuffle(rows["train"])  # labels interleaved: the draw follows each label's first appearance
    if split is not None:
        (base / split).write_text(json.dumps(rows))
    elif name == "fgvc_aircraft":
        (base / "variants.txt").write_text("".join(f"{c}\n" for c, _ in classes))
        for part in ("train", "val", "test"):
            (base / f"images_variant_{part}.txt").write_text(
                "".join(f"{Path(r[0]).stem} {r[2]}\n" for r in rows[part]))
    else:  # imagenet
        (base / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in classes))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """CoOp's DATA with all 11 datasets and FVG-PT masks at DATA/mask/<folder>/... (FVG-PT's ROOT = DATA)."""
    root = tmp_path_factory.mktemp("coop") / "DATA"
    for seed, name in enumerate(LAYOUTS):
        build_layout(name, root, masks_under=root, seed=seed)
    return root


# ---- the draw and the split --------------------------------------------------------------------------------------

def test_fewshot_draw_equals_dassl_on_many_lists():
    rng = random.Random(0)
    for case in range(200):
        n_classes = rng.randint(1, 12)
        labels = [rng.randrange(n_classes) for _ in range(rng.randint(1, 150))]
        shots, seed = rng.choice([1, 2, 4, 8, 16, 30]), rng.randrange(10_000)
        items = [(f"img{i}", lab) for i, lab in enumerate(labels)]
        ours = [items[i] for i in dassl_fewshot(labels, shots, seed)]
        assert ours == reference_fewshot(items, shots, seed), case


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_train_and_eval_each_dataset_by_name(name, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--dataset", name, "--root", str(data), "--out", str(run), "--shots", str(SHOTS),
                 "--seed", str(SEED), *TINY]) == 0
    assert "Base" in capsys.readouterr().out
    expected_names = [display for _, display in LAYOUTS[name][3]]
    classes = json.loads((run / "classes.json").read_text())
    assert [c["name"] for c in classes] == expected_names  # CoOp's label order and class-name fixes
    draw = reference_fewshot(reference_train_list(name, data), SHOTS, SEED)
    written = json.loads((run / "data.json").read_text())
    assert [(p, lab) for p, lab, _ in written["train"]] == draw  # image for image, in CoOp's order
    assert all(has_mask for _, _, has_mask in written["train"])  # FVG-PT's DATA/mask/<folder>/...
    assert written["dataset"] == name and written["mask_root"] == str(data)
    base = reference_base_labels(draw)
    assert [c["base"] for c in classes] == [label in base for label in range(len(classes))]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_images"] == {"base": 2, "new": 2, "base_with_mask": 2, "unreadable": 0}
    assert all(row["base"] is not None and row["new"] is not None for row in metrics["models"].values())


def test_masks_and_run_dirs_work_from_any_directory(data, tmp_path, monkeypatch):
    """Relative --data with an absolute --image-dir finds every mask; the run dir stores absolute paths, so
    `fvgpt eval RUN` works from elsewhere."""
    monkeypatch.chdir(data.parent)
    rel_data = Path("DATA") / "dtd"
    index = load_index(rel_data, shots=SHOTS, seed=SEED, image_dir=data / "dtd" / "images")
    assert index.train and all(s.mask is not None and s.mask.is_file() for s in index.train + index.test)
    assert main(["train", "--data", str(rel_data), "--image-dir", str(data / "dtd" / "images"), "--out", "run",
                 "--shots", "1", "--stage", "prompt", "--no-eval", *TINY]) == 0
    config = json.loads((data.parent / "run" / "config.json").read_text())["train"]
    assert config["data"] == str(data / "dtd") and config["image_dir"] == str(data / "dtd" / "images")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(data.parent / "run"), "--quiet"]) == 0
    assert json.loads((data.parent / "run" / "metrics.json").read_text())["test_images"]["base_with_mask"] == 2


def test_fvgpt_per_dataset_root_and_its_masks(tmp_path):
    """FVG-PT's run_tuning.py passes --root DATA/caltech-101, which holds caltech-101/ and mask/caltech-101/..."""
    fvgpt_root = tmp_path / "DATA" / "caltech-101"
    build_layout("caltech101", fvgpt_root, masks_under=fvgpt_root)
    index = load_index(fvgpt_root, SHOTS, SEED, dataset="Caltech101")
    assert index.mask_root == fvgpt_root and all(s.mask is not None for s in index.train + index.test)
    assert index.mask_root / "mask" / "caltech-101" / "101_ObjectCategories" in index.train[0].mask.parents
    with pytest.raises(DataError, match=f"pass --root {re.escape(str(fvgpt_root))}$"):
        load_index(tmp_path / "DATA", SHOTS, SEED, dataset="caltech101")
    build_layout("sun397", tmp_path / "DATA" / "sun-397")  # FVG-PT's root for SUN397 has another name
    with pytest.raises(DataError, match=f"pass --root {re.escape(str(tmp_path / 'DATA' / 'sun-397'))}$"):
        load_index(tmp_path / "DATA", SHOTS, SEED, dataset="sun397")
    with pytest.raises(DataError, match=r"holds datasets, not class folders: caltech-101/ \(caltech101\)"):
        load_index(fvgpt_root, SHOTS, SEED)  # as --data: it is a dataset's root, not a dataset


def test_generated_masks_land_where_fvgpt_looks(tmp_path):
    from fvgpt.masks import default_model_path

    if not default_model_path().is_file():
        pytest.skip(f"U²-Net-p not found at {default_model_path()}; fetch it first with `fvgpt masks --fetch-model`")
    root = tmp_path / "DATA"
    build_layout("eurosat", root, train_per_class=(1, 1, 1, 1))  # U²-Net's inference is the slow part
    build_layout("dtd", root, train_per_class=(1, 1, 1, 1))
    assert main(["masks", "--dataset", "eurosat", "--root", str(root), "--quiet"]) == 0
    index = load_index(root, SHOTS, SEED, dataset="eurosat")
    assert index.mask_root == root and all(s.mask is not None for s in index.train + index.test)
    # --data on one dataset of DATA: its masks join DATA/mask (where the loader looks), no other dataset's
    assert main(["masks", "--data", str(root / "dtd"), "--quiet"]) == 0
    per_dataset = 4 + 4
    written = sorted(p.relative_to(root / "mask") for p in (root / "mask").rglob("*") if p.is_file())
    assert [p.parts[:2] for p in written] == [("dtd", "images")] * per_dataset + [("eurosat", "2750")] * per_dataset


# ---- refusals: each names the folder searched and says what to do ----------------------------------------------

def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def _train(tmp_path: Path, *source: str) -> list[str]:
    return ["train", *source, "--out", str(tmp_path / "r"), "--shots", "1", *TINY]


def test_data_root_of_many_datasets_is_refused(data, tmp_path, capsys):
    err = _refused(_train(tmp_path, "--data", str(data)), capsys)
    assert f"{data} holds datasets, not class folders" in err and "caltech-101/ (caltech101)" in err
    assert f"--dataset NAME --root {data}" in err
    assert not (tmp_path / "r").exists()


def test_split_folders_are_refused(data, tmp_path, capsys):
    images = data / "imagenet" / "images"
    err = _refused(_train(tmp_path, "--data", str(images)), capsys)
    assert f"{images} holds split folders (train, val)" in err and "--dataset imagenet --root DATA" in err
    err = _refused(_train(tmp_path, "--data", str(images / "train")), capsys)
    assert f"{images / 'train'} is the train/ split of {images}" in err


@pytest.mark.parametrize("name", ["fgvc_aircraft", "imagenet"])
def test_a_dataset_with_a_reader_of_its_own_is_sent_to_dataset(name, data, tmp_path, capsys):
    folder = data / LAYOUTS[name][0]
    err = _refused(_train(tmp_path, "--data", str(folder)), capsys)
    assert f"{folder} is CoOp's" in err and f"--dataset {name} --root {data}" in err


def test_a_coop_folder_known_only_by_its_fewshot_cache(tmp_path, capsys):
    folder = tmp_path / "fgvc-aircraft-2013b"  # renamed, its lists gone: only CoOp's cache says what it is
    for sub in ("images", "split_fewshot"):
        (folder / sub).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / sub / "0.jpg")
    err = _refused(_train(tmp_path, "--data", str(folder)), capsys)
    assert f"{folder} holds split_fewshot/, CoOp's few-shot cache" in err and f"--root {tmp_path}" in err


def test_a_dataset_without_its_split_file(tmp_path, capsys):
    root = tmp_path / "DATA"
    build_layout("dtd", root)
    (root / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    err = _refused(_train(tmp_path, "--dataset", "dtd", "--root", str(root)), capsys)
    assert f"{root / 'dtd'} has no split_zhou_DescribableTextures.json" in err and "DATASETS.md" in err
    err = _refused(_train(tmp_path, "--data", str(root / "dtd")), capsys)
    assert "looks like CoOp's DescribableTextures folder but has no split_zhou_DescribableTextures.json" in err
    (root / "dtd" / "split_zhou_DescribableTextures.json").mkdir()  # there, but not a readable file
    err = _refused(_train(tmp_path, "--dataset", "dtd", "--root", str(root)), capsys)
    assert "split_zhou_DescribableTextures.json exists but cannot be read" in err


def test_root_pointing_at_the_dataset_itself(data, tmp_path, capsys):
    err = _refused(_train(tmp_path, "--dataset", "caltech101", "--root", str(data / "caltech-101")), capsys)
    assert f"is the Caltech101 folder itself; --root is the folder that holds it: --root {data}" in err
    err = _refused(_train(tmp_path, "--dataset", "caltech101", "--root", str(tmp_path / "nowhere")), capsys)
    assert f"--root {tmp_path / 'nowhere'} does not exist" in err
    err = _refused(_train(tmp_path, "--dataset", "caltech101", "--root", str(tmp_path)), capsys)
    assert f"no caltech-101/ in {tmp_path} (searched for {tmp_path / 'caltech-101'})" in err
    err = _refused(_train(tmp_path, "--dataset", "caltech-256", "--root", str(data)), capsys)
    assert "unknown dataset 'caltech-256'" in err and "caltech101" in err


def test_wrong_image_dir_is_named(data, tmp_path, capsys):
    wrong = data / "dtd" / "elsewhere"
    err = _refused(_train(tmp_path, "--data", str(data / "dtd"), "--image-dir", str(wrong)), capsys)
    assert f"--image-dir {wrong} does not exist" in err
    wrong = data / "food-101"
    err = _refused(_train(tmp_path, "--data", str(data / "dtd"), "--image-dir", str(wrong)), capsys)
    assert f"are not under {wrong}" in err and "is --image-dir right?" in err


def test_missing_and_unreadable_images_are_told_apart(tmp_path):
    root = tmp_path / "DATA"
    build_layout("dtd", root)
    draw = reference_fewshot(reference_train_list("dtd", root), SHOTS, SEED)
    Path(draw[0][0]).unlink()
    Path(draw[1][0]).write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.warns(UserWarning, match="skipped 1 missing and 1 unreadable training image"):
        index = load_index(root, SHOTS, SEED, dataset="dtd")
    assert {str(s.path) for s in index.train}.isdisjoint({draw[0][0], draw[1][0]})


def test_no_test_images_of_a_split_prints_a_dash(tmp_path, capsys):
    root = tmp_path / "DATA"
    build_layout("dtd", root)
    split_file = root / "dtd" / "split_zhou_DescribableTextures.json"
    split = json.loads(split_file.read_text())
    split["test"] = [row for row in split["test"] if row[1] < 2]  # no test image of a new class
    split_file.write_text(json.dumps(split))
    run = tmp_path / "run"
    assert main(["train", "--dataset", "dtd", "--root", str(root), "--out", str(run), "--shots", "1",
                 "--stage", "prompt", *TINY]) == 0
    table = capsys.readouterr().out
    assert "nan" not in table.lower() and " -" in table.splitlines()[-2]
    assert json.loads((run / "metrics.json").read_text())["models"]["coop"]["new"] is None
    assert main(["eval", str(run), str(run), "--quiet"]) == 0  # the summary of several runs
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and f"'-': {run.resolve()} has no new test images" in out
    assert re.search(r"^\S+ +coop +1 +\d+\.\d\d ± 0\.00 +- +- *$", out, re.MULTILINE), out


def test_data_is_checked_before_any_weights_load(demo_data, tmp_path, capsys):
    missing_weights = str(tmp_path / "no-such-checkpoint.safetensors")
    err = _refused(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                    "--model", "fvgpt-tiny", "--pretrained", missing_weights], capsys)
    assert f"dataset folder {tmp_path / 'nowhere'} does not exist" in err
    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(run), "--shots", "1", "--stage", "prompt",
                 "--no-eval", *TINY]) == 0
    config = json.loads((run / "config.json").read_text())
    config["train"]["pretrained"] = missing_weights  # loading the weights would now fail
    (run / "config.json").write_text(json.dumps(config))
    moved = tmp_path / "moved"
    err = _refused(["eval", str(run), "--data", str(moved)], capsys)
    assert f"dataset folder {moved} does not exist" in err
    shutil.copytree(demo_data, moved, ignore=shutil.ignore_patterns("red_circle"))  # one class fewer
    err = _refused(["eval", str(run), "--data", str(moved)], capsys)
    assert f"the classes of {moved} differ from the run's (5 vs 6" in err


@pytest.mark.parametrize("method, name, template", [("mmrl", "oxford_pets", "a photo of a {}, a type of pet."),
                                                    ("promptsrc", "dtd", None), ("mmrl", "dtd", "{} texture.")])
def test_the_other_backbones_train_on_a_dataset_by_name(method, name, template, data, tmp_path, capsys):
    """PromptSRC and MMRL on CoOp's datasets by name: the same draw and masks as CoOp's runs; MMRL's prompt is its
    template for that dataset; evaluation reports the stage-1 row and FVG-PT on it."""
    run = tmp_path / "run"
    assert main(["train", "--dataset", name, "--root", str(data), "--out", str(run), "--shots", str(SHOTS),
                 "--seed", str(SEED), "--method", method, "--rep-dim", "16", *TINY]) == 0
    config = json.loads((run / "config.json").read_text())["train"]
    assert config["method"] == method and config["mmrl_template"] == template
    written = json.loads((run / "data.json").read_text())
    assert [(p, lab) for p, lab, _ in written["train"]] == reference_fewshot(reference_train_list(name, data), SHOTS,
                                                                            SEED)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"zero-shot", method, "fvgpt"}
    assert all(row["base"] is not None and row["new"] is not None for row in metrics["models"].values())
    assert f"{method}" in capsys.readouterr().out
