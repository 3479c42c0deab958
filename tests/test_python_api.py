"""The Python API (fvgpt_runtime.load(...).classify(...)): every input kind, label routing, ranking, batch-size
independence, repository references and errors, against references computed from the bundle's graphs directly
(preprocess → Bundle.classify → softmax → sort); the README's example runs in tests/test_docs_examples.py."""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import fvgpt_runtime as fr
import numpy as np
import pytest
from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import BundleError
from fvgpt_runtime.preprocess import preprocess
from PIL import Image

from fvgpt.photos import photo_paths

def reference(bundle_dir: Path, images: list[Image.Image], labels: list[str] | None = None):
    """(labels in score order, probabilities (N, C), head) straight from the graphs, without the API."""
    b = Bundle(bundle_dir)
    pixels = np.stack([preprocess(im, b.preprocess) for im in images])
    s = b.classify(pixels, labels)
    z = s.logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    return s.labels, p / p.sum(1, keepdims=True), s.head


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return photo_paths()[:4]


@pytest.fixture(scope="module")
def clf(tiny_bundle):
    return fr.load(tiny_bundle)


def test_every_input_kind_gives_the_reference_ranking(clf, tiny_bundle, photos):
    images = [Image.open(p) for p in photos]
    names, probs, head = reference(tiny_bundle, images)
    as_paths = clf.classify([str(p) for p in photos], top_k=3)
    for i, result in enumerate(as_paths):
        order = np.argsort(-probs[i], kind="stable")[:3]
        assert [x.label for x in result.predictions] == [names[j] for j in order]
        assert np.allclose([x.probability for x in result.predictions], probs[i][order], atol=1e-6)
        assert result.head == head and result.label == names[order[0]]
    png = io.BytesIO()
    images[0].convert("RGB").save(png, format="PNG")
    rgb = images[0].convert("RGB")
    for one in (png.getvalue(), rgb, np.asarray(rgb), Path(photos[0])):
        (got,) = clf.classify(one, top_k=3)
        assert [x.label for x in got.predictions] == [x.label for x in as_paths[0].predictions]
        assert np.allclose([x.probability for x in got.predictions],
                           [x.probability for x in as_paths[0].predictions], atol=1e-6)


def test_labels_route_to_heads_and_top_k_defaults(clf, tiny_bundle, photos):
    classes = clf.labels
    assert classes == list(Bundle(tiny_bundle).classes.names)
    split = Bundle(tiny_bundle).classes
    base = [n for n, is_base in zip(split.names, split.base) if is_base]
    images = [Image.open(p) for p in photos[:2]]
    for labels in (base[:2], ["a cat", "a dog", base[0]]):
        names, probs, head = reference(tiny_bundle, images, labels)
        results = clf.classify(photos[:2], labels=labels)
        assert [r.head for r in results] == [head, head]
        assert head == ("base" if labels == base[:2] else "new")
        assert len(results[0].predictions) == len(labels)  # default 5, or every label when fewer
        assert {x.label for x in results[0].predictions} == set(names)
        assert np.allclose(sorted(x.probability for x in results[1].predictions), sorted(probs[1]), atol=1e-6)
    assert len(clf.classify(photos[0])[0].predictions) == 5
    assert abs(sum(x.probability for x in clf.classify(photos[0], top_k=len(classes))[0].predictions) - 1) < 1e-5


def test_results_do_not_depend_on_batch_size(clf, photos):
    images = [str(p) for p in photos] * 3
    one = clf.classify(images, top_k=4, batch_size=1)
    many = clf.classify(images, top_k=4, batch_size=7)
    for a, b in zip(one, many, strict=True):
        assert [x.label for x in a.predictions] == [x.label for x in b.predictions]
        assert max(abs(x.probability - y.probability) for x, y in zip(a.predictions, b.predictions)) <= 1e-6


def test_bad_inputs_raise_errors_that_name_them(clf, tmp_path, photos):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    cases = [(tmp_path / "missing.jpg", "missing.jpg does not exist"),
             (tmp_path / "broken.jpg", "broken.jpg is not an image"),
             (b"", "image is empty"),
             (np.zeros((4, 4), np.float32), "arrays must be uint8"),
             (42, "give a path, bytes, a PIL image")]
    for image, message in cases:
        with pytest.raises(fr.InputError, match=re.escape(message)):
            clf.classify([photos[0], image])
    with pytest.raises(fr.InputError, match="top_k must be between 1 and 2"):
        clf.classify(photos[0], labels=["a", "b"], top_k=3)
    with pytest.raises(fr.InputError, match=r"labels\[1\] 'A' repeats labels\[0\]"):
        clf.classify(photos[0], labels=["A", " A "])
    big = fr.load(clf.info.path, max_image_bytes=100)
    with pytest.raises(fr.InputError, match="bytes; the limit is 100"):
        big.classify(photos[0])


def test_repository_references_and_info(tiny_bundle, tiny_bundle_seed2, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_bundle, repo / "pets" / "1")
    shutil.copytree(tiny_bundle_seed2, repo / "pets" / "2")
    latest, first = fr.load(repo / "pets", verify=False), fr.load(f"{repo}/pets@1")
    assert (latest.info.name, latest.info.version) == ("pets", "2")
    assert latest.info.model_id == Bundle(tiny_bundle_seed2).model_id != first.info.model_id
    assert first.info.tower_id == latest.info.tower_id  # one backbone: one tower variant
    assert (first.info.runtime, first.info.precision) == ("onnx", "fp32")
    assert first.info.reason.startswith("safe default (no tuning profile")
    alone = fr.load(tiny_bundle).info
    assert (alone.name, alone.version, alone.classes) == (tiny_bundle.name, "1", len(first.labels))
    with pytest.raises(BundleError, match="has no classifier named 'cats' \\(it has: pets\\)"):
        fr.load(repo / "cats")
    with pytest.raises(BundleError, match="has no version '3'"):
        fr.load(f"{repo}/pets@3")
    with pytest.raises(BundleError, match="neither a bundle folder"):
        fr.load(tmp_path / "nowhere" / "x")
