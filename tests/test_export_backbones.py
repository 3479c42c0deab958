"""Bundles of PromptSRC and MMRL classifiers (docs/bundle-format.md, "Tower roles"): PromptSRC's prompted tower is its
own graph beside CLIP's (which is byte for byte the CoOp bundles' tower); MMRL's tower is split after the blocks it
leaves untouched into a trunk, CLIP's branch and its own branch. Checked against the torch model object (every
label route, new labels through the learner's own text graph, batches of 1..8), the parity report over every role,
the graph runs per image, tampering, the manifest's rules for roles, and `fvgpt tune` over the new graphs.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from fvgpt_export.build import ExportError, ExportOptions, calibration_inputs, export_model, tower_roles
from fvgpt_export.parity import parity_pixels
from fvgpt_export.tune import tune
from fvgpt_export.validate import validate_bundle
from fvgpt_runtime.bundle import Bundle, TowerRunner
from fvgpt_runtime.manifest import BundleError, Manifest, ManifestError
from fvgpt_runtime.shared_towers import SharedTowers
from fvgpt_runtime.tuning import choose

from fvgpt.rundir import load_run

NOVEL = ["rocket", "red circle", "zebra"]


def _manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _torch_heads(run, pixels: np.ndarray, labels: list[str] | None, head: str) -> np.ndarray:
    model = run.model
    names = list(model.classes.names) if labels is None else labels
    with torch.no_grad():
        heads = model.heads(model.encode_image(torch.from_numpy(pixels)), model.tables(names))
    return (heads.z_fdc if head == "base" else heads.z_pc).numpy()


@pytest.mark.parametrize("name", ["promptsrc", "mmrl"])
def test_bundle_equals_the_model_object_on_every_route(request, name):
    """Base labels (base head), all classes and never-seen labels (new head, their text through the learner's own
    text graph and CLIP's), at batches 1, 3 and 8, equal the torch model object's heads."""
    bundle = Bundle(request.getfixturevalue(f"{name}_bundle"))
    run = load_run(request.getfixturevalue(f"{name}_run"))
    pixels = parity_pixels(bundle.preprocess, 8)
    base = list(run.model.classes.base_names)
    for labels, head in ((base[::-1], "base"), (None, "new"), (NOVEL, "new")):
        for n in (1, 3, 8):
            scores = bundle.classify(pixels[:n], labels, precision="fp32")
            assert scores.head == head
            np.testing.assert_allclose(scores.logits, _torch_heads(run, pixels[:n], labels, head), atol=2e-4)
    learned, clip = bundle.encode_text(NOVEL)
    tables = run.model.tables(NOVEL)
    np.testing.assert_allclose(learned, tables.learned.numpy(), atol=1e-5)
    np.testing.assert_allclose(clip, tables.clip.numpy(), atol=1e-5)
    assert np.abs(learned - clip).max() > 1e-3  # the learner's text is not CLIP's


def test_promptsrc_bundle_keeps_clips_tower_shared(promptsrc_bundle, tiny_bundle):
    """PromptSRC: role "image" is CLIP's tower, the same id and bytes as a CoOp bundle's on the backbone; its prompted
    tower ("promptsrc") is this classifier's own; the heads read both; the shared text graph is the same bytes and
    the learner's text graph is listed apart."""
    m, coop = _manifest(promptsrc_bundle), _manifest(tiny_bundle)
    assert sorted(m["towers"]) == ["image", "promptsrc"] and "input" not in m["towers"]["promptsrc"]
    assert m["towers"]["image"] == coop["towers"]["image"]
    assert (promptsrc_bundle / "tower.fp32.onnx").read_bytes() == (tiny_bundle / "tower.fp32.onnx").read_bytes()
    assert (promptsrc_bundle / "text.onnx").read_bytes() == (tiny_bundle / "text.onnx").read_bytes()
    assert m["text"]["id"] == coop["text"]["id"] and m["learned_text"]["file"] == "promptsrc-text.onnx"
    assert m["towers"]["promptsrc"]["variants"]["onnx-fp32"]["id"] != coop["towers"]["image"]["variants"][
        "onnx-fp32"]["id"]
    assert m["heads"]["features"] == {"features": "promptsrc", "clip_features": "image"}
    assert m["prompts"] == {"n_ctx": 4, "learned": "X X X X {}.", "template": "a photo of a {}."}
    assert m["run"]["method"] == "promptsrc" and m["model_id"].startswith("fvgpt-fvgpt-tiny-")
    assert "input" not in coop["towers"]["image"] and "learned_text" not in coop  # CoOp bundles read as before


def test_mmrl_bundle_splits_the_tower_after_the_untouched_blocks(mmrl_bundle, mmrl_run, tiny_bundle, second):
    """MMRL: trunk (patch embedding + the blocks before the first representation layer) → CLIP's branch and MMRL's
    branch. trunk + CLIP branch computes exactly CLIP's tower (tiny_bundle's); each graph runs once per image; the
    trunk and CLIP branch graphs are shared with another MMRL classifier on the backbone, its MMRL branch is its own."""
    m = _manifest(mmrl_bundle)
    towers = m["towers"]
    assert {r: t.get("input") for r, t in towers.items()} == {"trunk": None, "image": "trunk", "mmrl": "trunk"}
    assert m["heads"]["features"] == {"features": "mmrl", "clip_features": "image"}
    assert m["prompts"]["n_ctx"] == 0 and m["prompts"]["learned"] == "a photo of a {}."
    assert m["learned_text"]["file"] == "mmrl-text.onnx" and m["default_precision"] == "int8"
    trunk = onnx.load(str(mmrl_bundle / towers["trunk"]["variants"]["onnx-fp32"]["file"]))
    assert [o.name for o in trunk.graph.output] == ["tokens"]
    bundle = Bundle(mmrl_bundle)
    pixels = parity_pixels(bundle.preprocess, 6)
    runs = []
    original = TowerRunner.__call__

    def counted(self, x):
        runs.append((self.role, len(x)))
        return original(self, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TowerRunner, "__call__", counted)
        out = bundle.towers("fp32")(pixels)
    assert runs == [("trunk", 10), ("image", 10), ("mmrl", 10)]  # one pass of each graph per image
    np.testing.assert_allclose(out["image"], Bundle(tiny_bundle).tower("fp32")(pixels), atol=1e-5)
    model = load_run(mmrl_run).model
    with torch.no_grad():
        f = model.encode_image(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(out["mmrl"], f[:, 1:], atol=1e-5)
    np.testing.assert_allclose(out["image"], f[:, 0], atol=1e-5)

    other = second["mmrl"]  # another MMRL classifier on the backbone: its own representation, the same trunk
    o = _manifest(other)["towers"]
    for role in ("trunk", "image"):
        assert o[role]["variants"]["onnx-fp32"] == towers[role]["variants"]["onnx-fp32"]
        file = towers[role]["variants"]["onnx-fp32"]["file"]
        assert (other / file).read_bytes() == (mmrl_bundle / file).read_bytes()
    assert o["mmrl"]["variants"]["onnx-fp32"]["id"] != towers["mmrl"]["variants"]["onnx-fp32"]["id"]
    assert _manifest(other)["model_id"] != m["model_id"]


@pytest.mark.parametrize("name", ["promptsrc", "mmrl"])
def test_parity_covers_every_role_and_validate_catches_a_changed_branch(request, name, tmp_path):
    """The export's parity report compares both feature inputs of the heads (the learner's and CLIP's) per variant,
    end to end and batch independence; `fvgpt validate` reruns them; a changed byte in the learner's own tower graph
    is refused."""
    path = request.getfixturevalue(f"{name}_bundle")
    checks = _manifest(path)["parity"]["checks"]
    for variant in ["fp32"] + (["int8"] if name == "mmrl" else []):
        assert set(checks[f"tower_{variant}"]["max_abs_diff"]) == {"features", "clip_features"}
        assert checks[f"end_to_end_{variant}"]["passed"] and checks[f"batch_independence_{variant}"]["passed"]
    assert checks["tower_fp32"]["max_abs_diff"]["features"] < 1e-4
    report = validate_bundle(path)
    assert report["passed"] and "tower_fp32" in report["checks"]
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    own = "promptsrc-tower.fp32.onnx" if name == "promptsrc" else "mmrl-branch.fp32.onnx"
    data = bytearray((copy / own).read_bytes())
    data[-10] ^= 1
    (copy / own).write_bytes(bytes(data))
    bad = validate_bundle(copy)
    assert not bad["passed"] and any(own in p for p in bad["files"])


def test_the_manifest_rules_for_tower_roles(mmrl_bundle, mmrl_run, tmp_path):
    """A role reading a role that does not exist, roles reading each other in a cycle, and roles without the same
    runtime × precision variants are refused by name; a one-tower call on a bundle of several roles says which."""
    doc = _manifest(mmrl_bundle)

    def broken(edit) -> str:
        d = json.loads(json.dumps(doc))
        edit(d)
        with pytest.raises(ManifestError) as info:
            Manifest.parse(d)
        return str(info.value)

    assert "read tower roles that do not exist" in broken(lambda d: d["towers"]["mmrl"].update(input="nope"))
    assert "form a cycle" in broken(lambda d: d["towers"]["trunk"].update(input="image"))
    assert "same runtime × precision variants" in broken(lambda d: d["towers"]["mmrl"]["variants"].pop("onnx-int8"))
    with pytest.raises(BundleError, match="tower roles trunk, image, mmrl"):
        Bundle(mmrl_bundle).tower()
    with pytest.raises(BundleError, match="not one image tower"):  # what a one-tower server opens: refused by name
        Manifest.read(mmrl_bundle).image_tower("onnx", "fp32")
    with pytest.raises(ExportError, match="--tensorrt builds an engine of a one-tower bundle"):
        export_model(load_run(mmrl_run).model, tmp_path / "trt", ExportOptions(progress=False, tensorrt=True),
                     "none", 0)
    assert not (tmp_path / "trt").exists()


def test_branches_calibrate_on_the_trunks_output(mmrl_bundle, mmrl_run):
    """OpenVINO's int8 calibration data per role: pixels for the trunk, the fp32 trunk's tokens for both branches
    (what they read when served)."""
    m = Manifest.read(mmrl_bundle)
    roles = tower_roles(load_run(mmrl_run).model)
    pixels = parity_pixels(m.preprocess, 3)
    inputs = calibration_inputs(mmrl_bundle, roles, pixels)
    trunk = TowerRunner(mmrl_bundle, m, "fp32", role="trunk")(pixels)
    assert [r.name for r in roles] == ["trunk", "image", "mmrl"] and inputs["trunk"] is pixels
    np.testing.assert_allclose(inputs["image"], trunk, atol=1e-6)
    assert inputs["mmrl"] is inputs["image"] and trunk.shape == (7, 65, 64)


def test_tune_measures_and_chooses_over_every_role(mmrl_bundle, tmp_path):
    """`fvgpt tune` on an MMRL bundle: every candidate (onnx fp32 and int8) passes the gate over all three graphs, is
    timed, and carries the id of its whole set of graphs; a server's choice accepts the profile."""
    path = tmp_path / "mmrl"
    shutil.copytree(mmrl_bundle, path)
    profile = tune(path, batch_sizes=[1, 2], iters=1, warmup=0, threads=1, progress=False)
    manifest = Manifest.read(path)
    names = {c["name"] for c in profile["candidates"]}
    assert {"onnx-fp32", "onnx-int8"} <= names
    for c in profile["candidates"]:
        assert c["gate"]["passed"] and c["tower_id"] == manifest.variant_id(c["runtime"], c["precision"])
        assert c["tower_id"].startswith("towers-") and len(c["results"]) == 2
    choice = choose(path, manifest)
    assert (choice.runtime, choice.precision) == (profile["choice"]["runtime"], profile["choice"]["precision"])
    assert choice.reason.startswith("tuning profile of")


def test_shared_towers_run_each_distinct_graph_once(tiny_bundle, promptsrc_bundle, mmrl_bundle, second):
    """A CoOp, a PromptSRC and an MMRL classifier on one backbone: CLIP's tower runs once for the CoOp classifier and
    PromptSRC's Prior Calibration (5 graph runs per image, not 1 + 2 + 3), and every bundle's features equal its own
    towers' and give its own scores. N PromptSRC classifiers run N + 1 graphs; N MMRL classifiers the trunk and CLIP's
    branch once and N branches (the spec's N + 1 and 1 + 0.58·N whole-tower passes)."""
    bundles = [Bundle(p) for p in (tiny_bundle, promptsrc_bundle, mmrl_bundle)]
    shared = SharedTowers(bundles, precision="fp32")
    assert shared.graph_runs == 5 and sum(SharedTowers([b], "fp32").graph_runs for b in bundles) == 6
    for name, alone in (("promptsrc", promptsrc_bundle), ("mmrl", mmrl_bundle)):
        pair = SharedTowers([Bundle(alone), Bundle(second[name])], "fp32")
        assert pair.graph_runs == {"promptsrc": 2 + 1, "mmrl": 2 + 2}[name]
    pixels = parity_pixels(bundles[0].preprocess, 5)
    runs = []
    original = TowerRunner.__call__

    def counted(self, x):
        runs.append(self.tower_id)
        return original(self, x)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TowerRunner, "__call__", counted)
        features = shared(pixels)
    assert len(runs) == len(set(runs)) == 5
    for bundle, by_role in zip(bundles, features):
        alone = bundle.towers("fp32")(pixels) if len(bundle.manifest.towers) > 1 else \
            {"image": bundle.tower("fp32")(pixels)}
        assert set(alone) <= set(by_role)
        for role, value in alone.items():
            np.testing.assert_array_equal(by_role[role], value)
        np.testing.assert_array_equal(bundle.scores(by_role).logits, bundle.classify(pixels, precision="fp32").logits)
    assert features[0]["image"] is features[1]["image"]  # one computation, two readers
