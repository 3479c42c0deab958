"""The generated world (fvgpt.world): exact masks, the correlation knob, uncorrelated test scenes, determinism, and
the layout fvgpt.data reads."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from fvgpt.data import load_index
from fvgpt.world import (ALL_KINDS, COLOURS, PATTERNS, SCENES, ObjectKind, TaskSpec, WorldError, base_classes,
                         caption, distractor_placement, make_task, render, sample_placement, seeded_rng, task_classes,
                         warm_light)

SMALL = TaskSpec(world_seed=3, classes=4, correlation=0.75, shots=8, test_images=16, image_size=32)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_task(tmp_path_factory.mktemp("world") / "task", SMALL)


def _doc(root) -> dict:
    return json.loads((root / "task.json").read_text())


@pytest.mark.parametrize("kind", [ALL_KINDS[i] for i in range(0, len(ALL_KINDS), 23)])
def test_mask_is_exactly_the_object(kind):
    """Outside the mask the image is the scene alone; inside it, the object, whatever the scene behind it."""
    seed = (7, ALL_KINDS.index(kind))
    on_grass, mask = render(kind, "grass", 48, seed)
    on_brick, mask_brick = render(kind, "brick", 48, seed)
    grass_only, empty = render(None, "grass", 48, seed)
    assert not empty.any() and np.array_equal(mask, mask_brick)
    assert 0.03 < mask.mean() < 0.45
    assert np.array_equal(on_grass[~mask], grass_only[~mask])
    assert np.array_equal(on_grass[mask], on_brick[mask])
    assert (on_grass[~mask] != on_brick[~mask]).any(axis=-1).mean() > 0.9  # the scenes do differ there


@pytest.mark.parametrize("i", range(6))
def test_a_distractor_shows_only_outside_the_mask(i):
    """With a distractor the mask and the object's pixels stay the same; outside the mask the image is the scene
    except where the distractor is; the distractor (drawn alone on a plain scene at the same seed) shows there."""
    kind, other = ALL_KINDS[40 * i], ALL_KINDS[40 * i + 17]
    seed = (9, i)
    with_d, mask = render(kind, "sand", 64, seed, other)
    alone, mask_alone = render(kind, "sand", 64, seed)
    scene, _ = render(None, "sand", 64, seed)
    assert np.array_equal(mask, mask_alone) and np.array_equal(with_d[mask], alone[mask])
    changed = (with_d != scene).any(-1) & ~mask  # where the distractor shows
    assert changed.sum() > 0.02 * 64 * 64, "the distractor must show beside the object"
    assert np.array_equal(with_d[~mask & ~changed], scene[~mask & ~changed])


def test_distractor_placement():
    """Radius 14–20 % of the side, fully inside the image, its centre outside the labelled object's radius."""
    rng = seeded_rng(4)
    for _ in range(200):
        under = sample_placement(rng, 64)
        at = distractor_placement(rng, 64, under)
        assert 0.14 * 64 <= at.radius <= 0.2 * 64
        assert at.radius <= at.cx <= 64 - at.radius and at.radius <= at.cy <= 64 - at.radius
        assert np.hypot(at.cx - under.cx, at.cy - under.cy) >= under.radius


def test_warm_light_is_a_colour_cast():
    image = render(ALL_KINDS[3], "snow", 32, (1, 2), ALL_KINDS[9])[0]
    assert warm_light(image, 0.0) is image
    warm = warm_light(image, 1.0)
    assert warm.dtype == np.uint8 and np.array_equal(warm[..., 0], image[..., 0])
    assert np.abs(warm[..., 1].astype(int) - np.round(image[..., 1] * 0.8)).max() == 0
    assert np.abs(warm[..., 2].astype(int) - np.round(image[..., 2] * 0.55)).max() == 0


@pytest.mark.parametrize("shape, fill", [("circle", np.pi / 4), ("ring", np.pi / 4 * 0.7)])
def test_round_masks_fill_their_bounding_box_as_geometry_says(shape, fill):
    """A disc covers π/4 of its bounding square, a ring with inner radius² = 0.3 covers 0.7 of that."""
    for i in range(5):
        _, mask = render(ObjectKind(shape, "red", "solid"), "sand", 128, (11, i))
        rows, cols = np.nonzero(mask)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert abs(mask.sum() / box - fill) < 0.03


def test_task_files_are_the_rendered_images_and_masks(task):
    doc = _doc(task)
    for rec in doc["images"][::5]:
        image = np.asarray(Image.open(task / rec["path"]))
        mask = np.asarray(Image.open(task / "mask" / rec["path"]))
        assert image.shape == (32, 32, 3) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask[..., 0] > 0, mask[..., 1] > 0)
        assert abs((mask[..., 0] > 0).mean() - rec["area"]) < 1e-3


def test_correlation_rate_is_respected(task):
    doc = _doc(task)
    favoured = {c["name"]: c["scene"] for c in doc["classes"]}
    train = [r for r in doc["images"] if r["path"].startswith("train/")]
    for name in favoured:
        mine = [r for r in train if r["class"] == name]
        assert len(mine) == SMALL.shots
        assert sum(r["correlated"] for r in mine) == round(SMALL.correlation * SMALL.shots)  # 6 of 8
        assert all(r["scene"] == favoured[name] for r in mine if r["correlated"])
    base = [c["scene"] for c in doc["classes"] if c["base"]]
    assert len(set(base)) == len(base)  # the base classes favour distinct scenes: the shortcut exists


def test_no_correlation_means_scenes_independent_of_the_class(tmp_path):
    root = make_task(tmp_path / "r0", replace(SMALL, correlation=0.0, shots=96, test_images=2, image_size=16))
    doc = _doc(root)
    favoured = {c["name"]: c["scene"] for c in doc["classes"]}
    train = [r for r in doc["images"] if r["path"].startswith("train/")]
    assert not any(r["correlated"] for r in train)
    on_favoured = np.mean([r["scene"] == favoured[r["class"]] for r in train])
    assert abs(on_favoured - 1 / len(SCENES)) < 0.07  # 384 draws: chance rate 0.125 ± 3 standard errors


def test_test_scenes_are_balanced_per_class_and_never_move(task, tmp_path):
    doc = _doc(task)
    test = [r for r in doc["images"] if r["path"].startswith("test/")]
    split_sizes = Counter(c["base"] for c in doc["classes"] for r in test if r["class"] == c["name"])
    assert split_sizes == {True: SMALL.test_images, False: SMALL.test_images}
    for name in {r["class"] for r in test}:
        counts = Counter(r["scene"] for r in test if r["class"] == name)
        per_scene = [counts.get(s, 0) for s in SCENES]
        assert max(per_scene) - min(per_scene) <= 1, (name, counts)
    other = make_task(tmp_path / "other", replace(SMALL, correlation=0.0, shots=2, draw=5))
    for rec in test:
        assert (task / rec["path"]).read_bytes() == (other / rec["path"]).read_bytes()


def test_generation_is_deterministic_by_seed(task, tmp_path):
    again = make_task(tmp_path / "again", SMALL)
    files = sorted(p.relative_to(task) for p in task.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    assert all((task / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert (task / "task.json").read_text() == (again / "task.json").read_text()
    redrawn = make_task(tmp_path / "draw2", replace(SMALL, draw=2))
    train = [f for f in files if f.parts[0] == "train"]
    assert sum((task / f).read_bytes() != (redrawn / f).read_bytes() for f in train) == len(train)
    other_world = make_task(tmp_path / "world4", replace(SMALL, world_seed=4, shots=1, test_images=2))
    assert base_classes(other_world) != base_classes(task)


def test_distractors_are_other_kinds_at_the_given_rate(task, tmp_path):
    """Every image of a task with rate 1 has a distractor, of a kind that is no class of the task; at rate ½ about
    half do; at 0 none (world v1); the file is the rendered image under the task's light."""
    doc = _doc(task)
    names = {c["name"] for c in doc["classes"]}
    assert all(r["distractor"] is not None and r["distractor"] not in names for r in doc["images"])
    assert len({r["distractor"] for r in doc["images"]}) > 10
    half = _doc(make_task(tmp_path / "half", replace(SMALL, distractors=0.5, shots=64, test_images=2)))
    rate = np.mean([r["distractor"] is not None for r in half["images"] if r["path"].startswith("train/")])
    assert abs(rate - 0.5) < 0.1  # 256 draws: ± 3 standard errors
    none = _doc(make_task(tmp_path / "none", replace(SMALL, distractors=0.0, shots=2, test_images=2)))
    assert all(r["distractor"] is None for r in none["images"])
    warm = make_task(tmp_path / "warm", replace(SMALL, light=0.6, shots=2, test_images=2))
    cold = make_task(tmp_path / "cold", replace(SMALL, shots=2, test_images=2))
    for rec in _doc(warm)["images"]:
        image, plain = (np.asarray(Image.open(root / rec["path"])) for root in (warm, cold))
        assert np.array_equal(image, warm_light(plain, 0.6))


@pytest.mark.parametrize("split, values", [("colour", tuple(COLOURS)), ("pattern", PATTERNS)])
def test_attribute_splits_give_base_and_new_disjoint_values(split, values):
    """base and new classes take disjoint halves of the attribute's values; the random split is world v1's order."""
    for world_seed in range(4):
        spec = TaskSpec(world_seed=world_seed, classes=12, split=split)
        classes = task_classes(spec.world_seed, spec.classes, split)
        base = {getattr(c.kind, split) for c in classes if c.base}
        new = {getattr(c.kind, split) for c in classes if not c.base}
        assert len(classes) == 12 and len({c.kind for c in classes}) == 12 and sum(c.base for c in classes) == 6
        assert not base & new and len(base) <= len(values) // 2 and len(new) <= len(values) // 2
    rng = seeded_rng(2, 0)
    assert [c.kind for c in task_classes(2, 6)] == [ALL_KINDS[i] for i in rng.permutation(len(ALL_KINDS))[:6]]


def test_a_task_is_read_by_the_library_with_masks(task):
    index = load_index(task, SMALL.shots, seed=1)
    doc = _doc(task)
    assert index.classnames == sorted(c["folder"] for c in doc["classes"])
    assert len(index.train) == SMALL.shots * SMALL.classes and len(index.test) == 2 * SMALL.test_images
    assert all(s.mask is not None for s in index.train + index.test)
    assert set(base_classes(task)) == {c["folder"] for c in doc["classes"] if c["base"]}
    with pytest.raises(WorldError, match="another task"):
        make_task(task, replace(SMALL, correlation=0.5))  # never mixes two tasks in one folder


def test_captions_name_the_object_or_the_scene_in_varied_words():
    rng = seeded_rng(0)
    kind = ObjectKind("star", "red", "striped")
    at = sample_placement(rng, 64)
    captions = {caption(kind, "water", at, 64, rng) for _ in range(200)}
    assert len(captions) > 30
    assert all("star" in c or any(w in c for w in ("water", "sea", "lake", "waves", "ocean")) for c in captions)
    assert any("star" in c and ("sea" in c or "lake" in c or "water" in c) for c in captions)
    assert "a photo of a striped red star." in captions  # the zero-shot template is one of the wordings


def test_bad_task_settings_are_refused():
    with pytest.raises(WorldError, match="correlation"):
        TaskSpec(correlation=1.5)
    with pytest.raises(WorldError, match="classes"):
        TaskSpec(classes=1)
    with pytest.raises(WorldError, match="split must be one of random, colour, pattern"):
        TaskSpec(split="shape")
    with pytest.raises(WorldError, match="distractors must be in"):
        TaskSpec(distractors=-0.1)
    with pytest.raises(WorldError, match="light must be in"):
        TaskSpec(light=2)
