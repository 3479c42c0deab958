"""PromptSRC and MMRL classifiers served from one repository beside a CoOp one (the engine in-process, real runtimes,
the fvgpt-tiny bundles): every tower graph they share runs once per image for all of them, GET /models shows which
towers each classifier runs, and each answer equals its bundle run alone. Expectations come from the manifests
(Manifest.tower_keys, the bundles' own files) and from fvgpt_runtime in-process, never from the engine."""
from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import Manifest
from fvgpt_runtime.preprocess import preprocess
from serving_support import Server, assert_matches, engine_client, photo_bytes, post_files, returned, running

pytestmark = pytest.mark.slow

CLASSIFIERS = ("coop", "psrc", "psrc-b", "mmrl", "mmrl-b")
PRECISION = "fp32"  # graphs are shared at one precision (mmrl_bundle's default is int8, the others' fp32)


@pytest.fixture(scope="module")
def layout(tiny_bundle, promptsrc_bundle, mmrl_bundle, second, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("roles")
    for name, source in zip(CLASSIFIERS, (tiny_bundle, promptsrc_bundle, second["promptsrc"], mmrl_bundle,
                                          second["mmrl"])):
        shutil.copytree(source, root / name / "1")
    return root


@pytest.fixture(scope="module")
def client(layout):
    with engine_client(layout, repository=True, FVGPT_POLL_S="0", FVGPT_PRECISION=PRECISION) as c:
        yield c


def keys(layout: Path, name: str) -> dict[str, str]:
    """role → tower key at the precision the server runs."""
    return Manifest.read(layout / name / "1").tower_keys("onnx", PRECISION)


def tower_images(client) -> dict[str, int]:
    return {t["tower_id"]: t["images"] for t in client.get("/info").json()["towers"]}


def test_models_show_the_towers_each_classifier_shares(client, layout):
    listed = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert all(listed[n]["state"] == "ready" for n in CLASSIFIERS), listed
    for name in CLASSIFIERS:
        assert listed[name]["towers"] == keys(layout, name)
        assert listed[name]["tower_id"] == Manifest.read(layout / name / "1").variant_id("onnx", PRECISION)
    coop, psrc, psrc_b, mmrl, mmrl_b = (listed[n]["towers"] for n in CLASSIFIERS)
    assert coop == {"image": listed["coop"]["tower_id"]}
    assert psrc["image"] == psrc_b["image"] == coop["image"]  # Prior Calibration's pass is CoOp's tower
    assert psrc["promptsrc"] != psrc_b["promptsrc"]  # each prompted tower is its classifier's own
    assert mmrl["trunk"] == mmrl_b["trunk"] and mmrl["image"] == mmrl_b["image"] and mmrl["mmrl"] != mmrl_b["mmrl"]
    assert mmrl["image"].endswith(f"<{mmrl['trunk']}")  # CLIP's branch reads the trunk
    # every distinct key is one open tower: CLIP's, 2 prompted, the trunk, CLIP's branch, 2 MMRL branches
    assert set(tower_images(client)) == {k for t in (coop, psrc, psrc_b, mmrl, mmrl_b) for k in t.values()}
    assert len(tower_images(client)) == 7


def test_each_shared_tower_runs_once_per_image(client, layout):
    images = [photo_bytes(0), photo_bytes(3)]
    before = tower_images(client)
    r = post_files(client, images, models=list(CLASSIFIERS))
    assert r.status_code == 200, r.text
    ran = {t: n - before.get(t, 0) for t, n in tower_images(client).items()}
    assert ran == dict.fromkeys(ran, len(images))  # 7 graphs, each once per image, not 1 + 2·2 + 2·3 = 11
    for per_image, data in zip(r.json()["results"], images):
        for result, name in zip(per_image["models"], CLASSIFIERS):
            assert result["model"] == name
            assert_matches(Bundle(layout / name / "1"), result, data, None, PRECISION)


def test_one_classifier_alone_and_new_labels(client, layout):
    """Asked alone, each multi-role classifier runs just its own towers; labels outside its classes go through its
    learner's text graph and still match the bundle in-process."""
    data = photo_bytes(1)
    for name, labels in (("psrc", ["red_circle", "a pink star"]), ("mmrl", None), ("mmrl-b", ["a pink star", "x"])):
        before = tower_images(client)
        r = post_files(client, [data], model=name, **({"labels": labels} if labels else {}))
        assert r.status_code == 200, r.text
        ran = {t for t, n in tower_images(client).items() if n != before.get(t, 0)}
        assert ran == set(keys(layout, name).values())
        assert_matches(Bundle(layout / name / "1"), r.json()["results"][0], data, labels, PRECISION)
        assert returned(r.json()["results"][0])


def test_readers_of_one_trunk_in_one_batch_get_their_own_rows(client, layout):
    """Requests for different MMRL classifiers queued together: one batch, one trunk run over all their images, each
    branch on its own request's rows only, and each request gets its own images' features (each bundle's towers run
    alone in-process)."""
    a, b = (Bundle(layout / n / "1") for n in ("mmrl", "mmrl-b"))
    ka, kb = keys(layout, "mmrl"), keys(layout, "mmrl-b")
    photos = [preprocess(Image.open(io.BytesIO(photo_bytes(i))), a.preprocess) for i in range(4)]
    pixels = photos + [photos[0][:, ::-1].copy()]  # five different images
    pool, metrics = client.engine.pool, client.engine.metrics
    batches, before = metrics.snapshot()["batches"], tower_images(client)

    async def together():
        with pool._cond:  # the batcher waits until both requests are queued (the lock is re-entrant on this thread)
            tasks = [asyncio.ensure_future(pool.outputs(ka["trunk"], pixels[:2], [ka["mmrl"], ka["image"]])),
                     asyncio.ensure_future(pool.outputs(kb["trunk"], pixels[2:], [kb["mmrl"]]))]
            await asyncio.sleep(0)
        return await asyncio.gather(*tasks)

    got_a, got_b = client.call(together())
    assert metrics.snapshot()["batches"] - batches == 1
    ran = {t: n - before.get(t, 0) for t, n in tower_images(client).items()}
    assert {t: n for t, n in ran.items() if n} == {ka["trunk"]: 5, ka["image"]: 2, ka["mmrl"]: 2, kb["mmrl"]: 3}
    want_a = a.towers(PRECISION)(np.stack(pixels[:2]))
    want_b = b.towers(PRECISION)(np.stack(pixels[2:]))
    assert set(got_a) == {ka["mmrl"], ka["image"]} and set(got_b) == {kb["mmrl"]}
    np.testing.assert_allclose(got_a[ka["mmrl"]], want_a["mmrl"], atol=1e-5)
    np.testing.assert_allclose(got_a[ka["image"]], want_a["image"], atol=1e-5)
    np.testing.assert_allclose(got_b[kb["mmrl"]], want_b["mmrl"], atol=1e-5)


def test_over_http_the_shell_answers_as_the_engine(client, layout, tmp_path):
    """The real BentoML shell on the same repository: GET /models lists the same towers, /classify the same answers."""
    server = Server(layout, tmp_path / "server.log", repository=True, FVGPT_POLL_S="0", FVGPT_PRECISION=PRECISION)
    with running(server):
        listed = {m["name"]: m["towers"] for m in server.get("/models").json()["models"]}
        assert listed == {m["name"]: m["towers"] for m in client.get("/models").json()["models"]}
        images = [photo_bytes(2)]
        over_http = post_files(server, images, models=["*"])
        assert over_http.status_code == 200, over_http.text
        in_process = post_files(client, images, models=["*"]).json()
        pairs = list(zip(over_http.json()["results"][0]["models"], in_process["results"][0]["models"], strict=True))
        assert [r["model"] for r, _ in pairs] == sorted(CLASSIFIERS)
        for http, engine in pairs:
            assert (http["model"], http["head"], list(returned(http))) == \
                (engine["model"], engine["head"], list(returned(engine)))
            assert max(abs(v - returned(engine)[k]) for k, v in returned(http).items()) <= 1e-6
