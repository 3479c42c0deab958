"""POST /explain in the engine, in-process: the same parse, decode and preprocessing as /classify, the same ranked
labels, and heatmaps that equal the torch model's last-layer decomposition read along the served head's text row.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fvgpt.explain import ExplainTower, label_maps
from fvgpt.rundir import load_run
from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.preprocess import crop_box, preprocess
from serving_support import b64, engine_client, photo_bytes

DISPLAY_SIDE = 384


@pytest.fixture(scope="module")
def client(tiny_explain_bundle):
    with engine_client(tiny_explain_bundle, FVGPT_POLL_S="0") as c:
        yield c


@pytest.fixture(scope="module")
def bundle(tiny_explain_bundle) -> Bundle:
    return Bundle(tiny_explain_bundle)


@pytest.fixture(scope="module")
def torch_explain(tiny_run):
    return ExplainTower(load_run(tiny_run, require_plugin=True).model.backbone.model.visual)


def torch_grid(explain: ExplainTower, bundle: Bundle, data: bytes, label: str, head: str) -> np.ndarray:
    """The map computed in torch on the same bytes: decomposition · the head's text row of `label`."""
    pixels = torch.from_numpy(preprocess(Image.open(io.BytesIO(data)), bundle.preprocess)[None])
    with torch.no_grad():
        _, contrib = explain(pixels)
    row = torch.from_numpy(bundle.directions([label], head))
    return label_maps(contrib, row).numpy().reshape(8, 8)


def explain_files(client, images: list[bytes], **fields):
    files = [("images", (f"img{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return client.post("/explain", files=files, data=fields)


def test_explain_ranks_like_classify_and_maps_the_top_label(client, bundle, torch_explain):
    images = [photo_bytes(0), photo_bytes(1)]
    r = explain_files(client, images, top_k="3")
    assert r.status_code == 200, r.text
    doc = r.json()
    classified = client.post("/classify", files=[("images", (f"i{i}", d)) for i, d in enumerate(images)],
                             data={"top_k": "3"}).json()["results"]
    assert doc["precision"] == "fp32" and doc["explain_graph"].startswith("explain-")
    for result, plain, data in zip(doc["results"], classified, images):
        assert result["head"] == plain["head"] == "new"  # the explain graph's features: the tower's, to float error
        assert [p["label"] for p in result["predictions"]] == [p["label"] for p in plain["predictions"]]
        assert max(abs(a["probability"] - b["probability"]) for a, b in zip(result["predictions"],
                                                                             plain["predictions"])) <= 1e-5
        (heat,) = result["heatmaps"]
        assert heat["label"] == result["predictions"][0]["label"]
        grid = np.array(heat["grid"])
        assert grid.shape == (8, 8)  # 64 px / 8 px patches
        expected = torch_grid(torch_explain, bundle, data, heat["label"], "new")
        assert np.abs(grid - expected).max() <= 1e-5 and abs(grid.sum() - expected.sum()) <= 1e-5
        photo = Image.open(io.BytesIO(data))
        assert result["crop"] == pytest.approx(list(crop_box(*photo.size, bundle.preprocess)))
        png = Image.open(io.BytesIO(base64.b64decode(heat["png"])))
        thumb = photo.convert("RGB")
        thumb.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
        assert png.format == "PNG" and png.size == thumb.size
        x0, _, x1, _ = result["crop"]
        drawn, original = np.asarray(png.convert("RGB")), np.asarray(thumb)
        left, right = round(x0 * thumb.width), round(x1 * thumb.width)
        assert np.array_equal(drawn[:, :left], original[:, :left])  # outside the crop: untouched
        assert np.array_equal(drawn[:, right:], original[:, right:])
        assert not np.array_equal(drawn[:, left:right], original[:, left:right])


def test_targets_get_one_map_each_along_the_base_head(client, bundle, torch_explain):
    base = bundle.classes.base_names
    data = photo_bytes(2)
    r = client.post("/explain", json={"images": [b64(data)], "labels": base, "targets": base[:2]})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["head"] == "base" and [h["label"] for h in result["heatmaps"]] == base[:2]
    for heat in result["heatmaps"]:  # base head: the adapted rows G̃
        assert np.abs(np.array(heat["grid"]) - torch_grid(torch_explain, bundle, data, heat["label"], "base")).max() \
            <= 1e-5
    grids = [np.array(h["grid"]) for h in result["heatmaps"]]
    assert not np.allclose(grids[0], grids[1])  # class-conditional


@pytest.mark.parametrize("doc,status,message", [
    ({"targets": ["a unicorn"]}, 400, "targets ['a unicorn'] are not among the labels scored"),
    ({"models": "*"}, 400, "POST /explain answers for one classifier"),
    ({"targets": []}, 400, "targets is empty"),
    ({"images": ["bm90IGFuIGltYWdl"]}, 400, "images[0] is not an image in a supported format"),
])
def test_bad_explain_requests_are_refused_with_the_reason(client, doc, status, message):
    r = client.post("/explain", json={"images": [b64(photo_bytes(0))]} | doc)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert client.post("/classify", json={"images": [b64(photo_bytes(0))]}).status_code == 200  # still serving


def test_a_bundle_without_explain_answers_404_saying_how(tiny_bundle):
    with engine_client(tiny_bundle, FVGPT_POLL_S="0") as c:
        r = c.post("/explain", json={"images": [b64(photo_bytes(0))]})
        assert r.status_code == 404 and "fvgpt export --explain" in r.json()["error"]
        assert c.post("/classify", json={"images": [b64(photo_bytes(0))]}).status_code == 200
