"""A model repository in one engine, in-process: real bundles, real towers in the engine's worker process, the
folder polled for changes; no server, no mocks.

One repository engine for the module (API key set, polling every 0.5 s) holds two classifiers' versions on the tiny
tower (shapes@1, shapes@2), a zero-shot classifier on it (animals, unversioned), two generated classifiers on another
tower (other-a, other-b), a bundle that fails verification (broken) and a folder that is no bundle (empty). A second
engine serves other-a's bundle alone, for the "equals serving that bundle alone" comparison. (The OpenAPI document is
checked against a real server's answers in tests/test_serving_http.py.)
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import Manifest
from fvgpt_runtime.repository import Found, scan
from fvgpt_serving.engine.repository import Snapshot
from serving_support import assert_matches, b64, engine_client, photo_bytes, post_files, post_json, returned

pytestmark = pytest.mark.slow

KEY = "repo-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}
PICKUP_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def layout(tiny_bundle, tiny_bundle_seed2, tiny_zero_shot_bundle, generated_repository, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(tiny_bundle, root / "shapes" / "1")
    shutil.copytree(tiny_bundle_seed2, root / "shapes" / "2")
    shutil.copytree(tiny_zero_shot_bundle, root / "animals")
    shutil.copytree(generated_repository / "clf-0000" / "1", root / "other-a" / "1")
    shutil.copytree(generated_repository / "clf-0001" / "1", root / "other-b" / "7")
    shutil.copytree(tiny_bundle, root / "broken" / "1")
    with open(root / "broken" / "1" / "tables.safetensors", "ab") as fh:
        fh.write(b"\0")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def servers(layout, generated_repository):
    with engine_client(layout, repository=True, FVGPT_API_KEY=KEY, FVGPT_POLL_S="0.5", FVGPT_READY_TTL_S="0") as repo, \
            engine_client(generated_repository / "clf-0000" / "1", FVGPT_POLL_S="0") as alone:
        yield repo, alone


@pytest.fixture(scope="module")
def url(servers):
    return servers[0]


def bundles(layout: Path) -> dict[str, Bundle]:
    return {"shapes@1": Bundle(layout / "shapes" / "1"), "shapes@2": Bundle(layout / "shapes" / "2"),
            "animals@1": Bundle(layout / "animals"), "other-a@1": Bundle(layout / "other-a" / "1"),
            "other-b@7": Bundle(layout / "other-b" / "7")}


def listed(url) -> dict[str, dict]:
    r = url.get("/models", headers=AUTH)
    assert r.status_code == 200, r.text
    return {f"{m['name']}@{m['version']}": m for m in r.json()["models"]}


def wait_for(url, condition, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < PICKUP_TIMEOUT_S:
        if condition(listed(url)):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"not within {PICKUP_TIMEOUT_S:.0f} s: {what}")


def swap_in(source: Path, target: Path) -> None:
    """Replace `target` by a copy of `source` the way `fvgpt export --force` does: copy beside it, rename the old
    one away, rename the new one in."""
    staging, old = target.parent / f".{target.name}.new", target.parent / f".{target.name}.old"
    shutil.copytree(source, staging)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def tower_images(url) -> dict[str, int]:
    """Images each tower has run (GET /info)."""
    return {t["tower_id"]: t["images"] for t in url.get("/info", headers=AUTH).json()["towers"]}


# ---- layout rules (no server) -----------------------------------------------------------------------------------
def test_scan_reads_the_layout(tmp_path):
    for folder in ("a/1", "a/2", "a/10", "a/.3.tmp", "b", "c/x", "d", ".hidden/1", "bad name/1"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "b" / "manifest.json").write_text("{}")
    (tmp_path / "README.txt").write_text("not a classifier")
    found = {(f.name, f.version): f.problem for f in scan(tmp_path, single=False)}
    assert [k for k in found if k[0] == "a"] == [("a", "1"), ("a", "2"), ("a", "10")]  # numeric order, hidden skipped
    assert found[("a", "1")] is None and found[("b", "1")] is None  # NAME/manifest.json: version "1"
    assert "integers" in found[("c", "x")] and "neither a bundle" in found[("d", "")]
    assert "not a classifier name" in found[("bad name", "")]
    assert not any(name.startswith(".") for name, _ in found) and ("README.txt", "") not in found
    assert scan(tmp_path / "b", single=True)[0].key == ("b", "1")


def test_resolution_rules():
    snap = Snapshot({}, scanned=False)
    with pytest.raises(Exception, match="still loading"):
        snap.resolve(None, None, 10)
    empty = Snapshot({}, scanned=True)
    with pytest.raises(Exception, match="no classifiers yet"):
        empty.resolve(None, ["*"], 10)
    assert Found("a", "1", Path("a")).key == ("a", "1")


# ---- the repository server ----------------------------------------------------------------------------------------
def test_models_lists_every_version_with_its_state(url, layout):
    models = listed(url)
    ready = {k for k, m in models.items() if m["state"] == "ready"}
    assert ready == {"shapes@1", "shapes@2", "animals@1", "other-a@1", "other-b@7"}
    assert models["shapes@2"]["default"] and not models["shapes@1"]["default"]
    assert "sha256 mismatch" in models["broken@1"]["reason"] and models["broken@1"]["state"] == "failed"
    assert models["empty@"]["state"] == "failed" and "neither a bundle" in models["empty@"]["reason"]
    tiny_tower, other_tower = (Manifest.read(layout / p).tower_id for p in ("shapes/1", "other-a/1"))
    assert tiny_tower != other_tower
    assert {m["tower_id"] for k, m in models.items() if k.split("@")[0] in ("shapes", "animals")} == {tiny_tower}
    assert models["other-a@1"]["tower_id"] == models["other-b@7"]["tower_id"] == other_tower
    assert models["animals@1"]["kind"] == "zero-shot" and models["shapes@1"]["classes"] == 6
    info = url.get("/info", headers=AUTH).json()
    assert {t["tower_id"] for t in info["towers"]} == {tiny_tower, other_tower}  # one tower per tower id
    assert info["classifiers"] == {"versions": len(models), "ready": 5} and "model_id" not in info
    assert url.get("/info", params={"model": "shapes@1"}, headers=AUTH).json()["tower"]["tower_id"] == tiny_tower


def test_selection_forms(url, layout):
    b = bundles(layout)
    image = b64(photo_bytes(1))
    r = post_json(url, {"images": [image]}, AUTH)
    assert r.status_code == 400 and "animals, broken, empty, other-a, other-b, shapes" in r.json()["error"]
    for model, key in (("shapes", "shapes@2"), ("shapes@1", "shapes@1"), ("animals", "animals@1")):
        r = post_json(url, {"images": [image], "model": model}, AUTH)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]  # one classifier: one result per image, today's shape
        assert (f"{result['model']}@{result['version']}", result["model_id"]) == (key, b[key].model_id)
    r = post_files(url, [photo_bytes(1)], AUTH, model="other-b")  # multipart, another tower
    assert r.status_code == 200 and r.json()["results"][0]["version"] == "7"
    r = post_files(url, [photo_bytes(1)], AUTH, models=["shapes@1", "animals"])
    assert r.status_code == 200, r.text
    assert [m["model"] for m in r.json()["results"][0]["models"]] == ["shapes", "animals"]
    for everything in (post_json(url, {"images": [image], "models": "*"}, AUTH),
                       post_files(url, [photo_bytes(1)], AUTH, models="*")):
        assert everything.status_code == 200, everything.text
        assert [(m["model"], m["version"]) for m in everything.json()["results"][0]["models"]] == \
            [("animals", "1"), ("other-a", "1"), ("other-b", "7"), ("shapes", "2")]  # ready ones, by name
    errors = {
        "unknown classifier": ({"model": "nope"}, 404, "no classifier named 'nope'"),
        "unknown version": ({"model": "shapes@9"}, 404, "has no version '9'"),
        "refused bundle": ({"model": "broken"}, 503, "sha256 mismatch"),
        "both fields": ({"model": "shapes", "models": ["animals"]}, 400, "not both"),
        "repeated": ({"models": ["shapes", "shapes"]}, 400, "repeats"),
        "empty list": ({"models": []}, 400, "non-empty list"),
        "star in a list": ({"models": ["*", "shapes"]}, 400, "stands alone"),
        "not a string": ({"model": 3}, 400, "must be a string"),
        "subset labels": ({"models": ["shapes", "animals"], "labels": ["cat"], "mode": "subset"}, 400,
                          "shapes@2: labels[0] 'cat' is not a bundled class"),
    }
    for case, (fields, status, message) in errors.items():
        r = post_json(url, {"images": [image]} | fields, AUTH)
        assert r.status_code == status and message in r.json()["error"], (case, r.text)


LABEL_SETS = {"every class": None, "new labels": ["a cat", "an astronaut", "a cup of coffee"],
              "tiny base classes": ["blue_triangle", "green_square", "purple_circle"],
              "mixed": ["red_circle", "a rocket", "cat"]}


@pytest.mark.parametrize("labels", list(LABEL_SETS))
def test_every_classifier_equals_its_bundle_alone(servers, layout, labels):
    """Several classifiers on two towers in one request: each result equals that bundle's own (in-process
    Bundle.classify on the same bytes, and a server holding only that bundle for other-a)."""
    url, alone = servers
    chosen = LABEL_SETS[labels]
    refs = ["shapes@1", "shapes@2", "animals@1", "other-a@1", "other-b@7"]
    images = [photo_bytes(i) for i in range(3)]
    doc = {"images": [b64(d) for d in images], "models": refs, "top_k": 3} | ({"labels": chosen} if chosen else {})
    r = post_json(url, doc, AUTH)
    assert r.status_code == 200, r.text
    b = bundles(layout)
    for data, per_image in zip(images, r.json()["results"]):
        assert [f"{m['model']}@{m['version']}" for m in per_image["models"]] == refs
        for ref, result in zip(refs, per_image["models"]):
            assert_matches(b[ref], result, data, chosen)
    single = post_json(alone, {k: v for k, v in doc.items() if k != "models"})
    assert single.status_code == 200, single.text
    for per_image, own in zip(r.json()["results"], single.json()["results"]):
        shared = per_image["models"][3]
        assert shared["model_id"] == own["model_id"] and shared["head"] == own["head"]
        assert list(returned(shared)) == list(returned(own))
        assert max(abs(returned(shared)[k] - v) for k, v in returned(own).items()) <= 1e-6


def test_one_tower_pass_per_image(url, layout):
    tiny, other = (Manifest.read(layout / p).tower_id for p in ("shapes/1", "other-a/1"))
    images = [photo_bytes(0), photo_bytes(2)]
    before = tower_images(url)
    r = post_files(url, images, AUTH, models=["shapes@1", "shapes@2", "animals"])  # three classifiers, one tower
    assert r.status_code == 200, r.text
    after = tower_images(url)
    assert (after[tiny] - before[tiny], after[other] - before[other]) == (2, 0)
    r = post_files(url, images, AUTH, models=["shapes", "animals", "other-a", "other-b"])  # two towers
    assert r.status_code == 200, r.text
    final = tower_images(url)
    assert (final[tiny] - after[tiny], final[other] - after[other]) == (2, 2)


def test_hot_add_replace_and_remove(url, layout, tiny_bundle, tiny_bundle_seed2):
    old, new = Bundle(tiny_bundle), Bundle(tiny_bundle_seed2)
    staging = layout / ".newcomer"
    shutil.copytree(tiny_bundle, staging / "1")
    os.replace(staging, layout / "newcomer")
    wait_for(url, lambda m: m.get("newcomer@1", {}).get("state") == "ready", "newcomer added")
    r = post_files(url, [photo_bytes(3)], AUTH, model="newcomer", top_k="6")
    assert r.status_code == 200, r.text
    assert_matches(old, r.json()["results"][0], photo_bytes(3), None)

    answers: list = []
    stop = threading.Event()

    def hammer() -> None:  # requests in flight while the version is replaced
        while not stop.is_set():
            answers.append(post_files(url, [photo_bytes(3)], AUTH, model="newcomer", top_k="6"))

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.5)
        swap_in(tiny_bundle_seed2, layout / "newcomer" / "1")
        wait_for(url, lambda m: m.get("newcomer@1", {}).get("model_id") == new.model_id, "newcomer replaced")
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
    assert answers and all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    by_id = {old.model_id: old, new.model_id: new}
    for a in answers:  # each answer wholly from one version: its model id and its probabilities
        result = a.json()["results"][0]
        assert_matches(by_id[result["model_id"]], result, photo_bytes(3), None)
    assert answers[-1].json()["results"][0]["model_id"] == new.model_id

    shutil.rmtree(layout / "newcomer")
    wait_for(url, lambda m: "newcomer@1" not in m, "newcomer removed")
    r = post_files(url, [photo_bytes(3)], AUTH, model="newcomer")
    assert r.status_code == 404 and "no classifier named 'newcomer'" in r.json()["error"]


def test_broken_bundles_are_refused_and_the_others_keep_serving(url, layout, tiny_zero_shot_bundle):
    bad = layout / ".garbled"
    shutil.copytree(tiny_zero_shot_bundle, bad)
    (bad / "manifest.json").write_text("{not json")
    os.replace(bad, layout / "garbled")
    wait_for(url, lambda m: m.get("garbled@1", {}).get("state") == "failed", "garbled refused")
    assert "not valid JSON" in listed(url)["garbled@1"]["reason"]
    assert url.ready()
    r = post_json(url, {"images": [b64(photo_bytes(0))], "models": "*"}, AUTH)
    assert r.status_code == 200 and len(r.json()["results"][0]["models"]) == 4
    swap_in(layout / "shapes" / "1", layout / "broken" / "1")  # fixed by a good copy
    wait_for(url, lambda m: m["broken@1"]["state"] == "ready", "broken fixed")
    shutil.rmtree(layout / "garbled")
    shutil.rmtree(layout / "broken")
    wait_for(url, lambda m: "broken@1" not in m and "garbled@1" not in m, "removed")


def test_admin_reload_picks_up_at_once_and_needs_the_key(url, layout, tiny_zero_shot_bundle):
    assert url.post("/admin/reload").status_code == 401
    assert url.get("/models").status_code == 401
    staging = layout / ".pets"
    shutil.copytree(tiny_zero_shot_bundle, staging)
    os.replace(staging, layout / "pets")
    r = url.post("/admin/reload", headers=AUTH)
    assert r.status_code == 200, r.text
    assert {m["name"]: m["state"] for m in r.json()["models"]}["pets"] == "ready"
    assert post_json(url, {"images": [b64(photo_bytes(0))], "model": "pets"}, AUTH).status_code == 200
    shutil.rmtree(layout / "pets")
    r = url.post("/admin/reload", headers=AUTH)
    assert "pets@1" in r.json()["changes"]["removed"] and "pets" not in {m["name"] for m in r.json()["models"]}


def test_labels_need_a_model_when_there_are_several(url, layout):
    r = url.get("/labels", headers=AUTH)
    assert r.status_code == 400 and "name one with 'model'" in r.json()["error"]
    doc = url.get("/labels", params={"model": "shapes@1"}, headers=AUTH).json()
    assert doc["model_id"] == Bundle(layout / "shapes" / "1").model_id and len(doc["classes"]) == 6
