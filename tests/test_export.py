"""Export: bundle format v2 equals the torch model, shares its tower and text graph across bundles on one backbone,
keeps a dynamic batch, gates its parity, and is verified byte for byte (docs/bundle-format.md)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import fvgpt_export.parity as parity
from fvgpt.cli import main
from fvgpt.photos import photo_paths
from fvgpt.rundir import RunDirError, load_run
from fvgpt_export.build import ExportError, ExportOptions, export_run, export_zero_shot
from fvgpt_export.parity import ParityError, parity_pixels
from fvgpt_export.validate import validate_bundle
from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import MANIFEST, BundleError, Manifest, ManifestError

QUICK = dict(progress=False, parity_images=16)


@pytest.fixture(scope="module")
def reference(tiny_run, tiny_bundle):
    """The torch model the bundle was made from, and real photos plus noise preprocessed the bundle's way."""
    model = load_run(tiny_run, require_plugin=True).model
    pixels = parity_pixels(Bundle(tiny_bundle).preprocess, 0)
    return model, np.concatenate([pixels, np.random.default_rng(0).normal(size=(4, *pixels.shape[1:]))]).astype(
        np.float32)


def _manifest(bundle) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


def test_export_writes_a_self_describing_v2_bundle(tiny_bundle, tiny_run):
    m = _manifest(tiny_bundle)
    assert m["schema_version"] == 2 and m["kind"] == "fvgpt" and m["default_precision"] == "fp32"
    assert m["classes"] == json.loads((tiny_run / "classes.json").read_text())
    assert set(m["files"]) == {"tower.fp32.onnx", "text.onnx", "heads.onnx", "tables.safetensors",
                               "tokenizer/bpe_simple_vocab_16e6.txt.gz", "parity_reference.safetensors"}
    assert m["heads"]["outputs"] == ["base_logits", "new_logits"] and m["heads"]["features"] == {"features": "image"}
    assert m["towers"]["image"]["variants"]["onnx-fp32"] | {"id": None} == {
        "file": "tower.fp32.onnx", "id": None, "runtime": "onnx", "precision": "fp32", "weights": None}
    assert m["towers"]["image"]["variants"]["onnx-fp32"]["id"].startswith("tower-")
    assert m["prompts"] == {"n_ctx": 4, "learned": "X X X X {}.", "template": "a photo of a {}."}
    checks = m["parity"]["checks"]
    assert set(checks) == {"heads", "text", "tower_fp32", "end_to_end_fp32", "batch_independence_fp32"}
    assert all(c["passed"] for c in checks.values())
    assert checks["batch_independence_fp32"]["max_probability_diff"]["new_logits"] <= 1e-5
    assert checks["end_to_end_fp32"]["top1_agreement"] == {"base_logits": 1.0, "new_logits": 1.0}
    assert max(checks["end_to_end_fp32"]["max_abs_diff"].values()) <= 1e-3
    assert len(m["digest"]) == 64


def test_bundles_on_one_backbone_share_tower_and_text_byte_for_byte(tiny_bundle, tiny_bundle_seed2,
                                                                     tiny_zero_shot_bundle):
    other = tiny_bundle_seed2
    a, b, z = _manifest(tiny_bundle), _manifest(other), _manifest(tiny_zero_shot_bundle)
    assert a["model_id"] != b["model_id"]  # two classifiers ...
    assert (tiny_bundle / "heads.onnx").read_bytes() != (other / "heads.onnx").read_bytes()
    for bundle in (other, tiny_zero_shot_bundle):  # ... one tower and one text graph, byte for byte
        for graph in ("tower.fp32.onnx", "text.onnx"):
            assert (bundle / graph).read_bytes() == (tiny_bundle / graph).read_bytes(), graph
    assert a["towers"] == b["towers"] == z["towers"] and a["text"] == b["text"] == z["text"]
    assert Manifest.read(tiny_bundle).tower_id == Manifest.read(other).tower_id


def test_other_weights_give_another_tower_id(tiny_zero_shot_bundle, tmp_path):
    other = export_zero_shot("fvgpt-tiny", "none", ["cat", "dog", "rocket"], tmp_path / "seed1", ExportOptions(**QUICK),
                             init_seed=1)
    assert Manifest.read(other).tower_id != Manifest.read(tiny_zero_shot_bundle).tower_id
    assert (other / "tower.fp32.onnx").read_bytes() != (tiny_zero_shot_bundle / "tower.fp32.onnx").read_bytes()


def test_bundle_equals_the_model_object_at_any_batch(tiny_bundle, reference):
    model, pixels = reference
    bundle = Bundle(tiny_bundle)
    names, base = list(model.classes.names), model.classes.base_names
    with torch.no_grad():
        f = model.encode_image(torch.from_numpy(pixels))
        tables = model.tables(names)
        z_fdc = model.heads(f, tables.rows(model.classes.base_ids)).z_fdc.numpy()
        z_pc = model.heads(f, tables).z_pc.numpy()
    tower = bundle.tower()
    features = tower(pixels)
    np.testing.assert_allclose(features, f.numpy(), atol=1e-5)
    np.testing.assert_allclose(bundle.scores(features, base).logits, z_fdc, atol=1e-4)
    np.testing.assert_allclose(bundle.scores(features).logits, z_pc, atol=1e-4)
    for n in (1, 3):  # the batch axis is dynamic: the same image gives the same answer at batch 1, 3 and 8
        np.testing.assert_allclose(tower(pixels[:n]), features[:n], atol=1e-6)
        np.testing.assert_allclose(bundle.scores(features[:n]).logits, z_pc[:n], atol=1e-4)


def test_new_labels_and_routing_match_the_model_object(tiny_bundle, reference):
    model, pixels = reference
    bundle = Bundle(tiny_bundle)
    features = bundle.tower()(pixels)
    f = torch.from_numpy(features)
    labels = ["orange star", "grey hexagon", model.classes.names[0]]
    learned, clip = bundle.label_features(labels)
    want = model.tables(labels)
    np.testing.assert_allclose(learned, want.learned.numpy(), atol=1e-5)
    np.testing.assert_allclose(clip, want.clip.numpy(), atol=1e-5)
    mixed = bundle.scores(features, labels)
    assert mixed.head == "new" and mixed.labels == labels
    with torch.no_grad():
        np.testing.assert_allclose(mixed.logits, model.heads(f, want).z_pc.numpy(), atol=1e-4)
        subset = [model.classes.base_names[2], model.classes.base_names[0]]
        routed = bundle.scores(features, subset)
        assert routed.head == "base" and routed.labels == subset
        np.testing.assert_allclose(routed.logits, model.heads(f, model.tables(subset)).z_fdc.numpy(), atol=1e-4)
    # a class named by its display form ("red circle" for the folder red_circle) is that class, not a new label
    name = model.classes.names[0]
    assert "_" in name
    np.testing.assert_array_equal(bundle.scores(features, [name.replace("_", " "), labels[0]]).logits,
                                  bundle.scores(features, [name, labels[0]]).logits)


def test_zero_shot_bundle_matches_plain_clip(tiny_zero_shot_bundle):
    from fvgpt.backbone import load_backbone
    from fvgpt.classes import ClassSplit
    from fvgpt.model import FVGPTModel

    bundle = Bundle(tiny_zero_shot_bundle)
    model = FVGPTModel(load_backbone("fvgpt-tiny", "none"), ClassSplit(("cat", "dog", "rocket"), (False,) * 3))
    pixels = np.random.default_rng(1).normal(size=(3, 3, 64, 64)).astype(np.float32)
    features = bundle.tower()(pixels)
    with torch.no_grad():
        f = model.encode_image(torch.from_numpy(pixels))
        want = model.heads(f, model.tables(["rocket", "zebra"])).z_clip.numpy()
    scores = bundle.scores(features, ["rocket", "zebra"])
    assert scores.head == "zero-shot"
    np.testing.assert_allclose(scores.logits, want, atol=1e-4)


def test_validate_passes_then_catches_tampering(tiny_bundle, tmp_path, capsys):
    assert validate_bundle(tiny_bundle)["passed"]
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / "tables.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "tables.safetensors").write_bytes(bytes(data))
    report = validate_bundle(copy)
    assert not report["passed"] and any("tables.safetensors" in p for p in report["files"])
    assert main(["validate", str(copy)]) == 1
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises(BundleError, match="sha256"):
        Bundle(copy)


def test_the_manifest_itself_is_covered(tiny_bundle, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(tiny_bundle, copy)
    doc = _manifest(copy)
    doc["classes"] = doc["classes"][:-1]  # drop a class: every file still matches its sha256
    (copy / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="changed after export"):
        Bundle(copy)
    assert not validate_bundle(copy)["passed"]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("heads"), "heads is missing"),
    (lambda d: d["heads"].update(file=3), "heads.file must be a string"),
    (lambda d: d["towers"]["image"]["variants"].update({"onnx-bf8": {"file": "x", "id": "y", "runtime": "onnx",
                                                                    "precision": "bf8"}}), "names onnx/bf8"),
    (lambda d: d["towers"]["image"]["variants"].update(
        {"openvino-int8": d["towers"]["image"]["variants"]["onnx-fp32"]}), "do not match their runtime"),
    (lambda d: d.update(default_precision="int8"), "default_precision 'int8' has no ONNX tower graph"),
    (lambda d: d["files"].pop("text.onnx"), "does not list"),
    (lambda d: d.update(schema_version=1), "re-export"),
])
def test_manifest_errors_name_the_field(tiny_bundle, edit, message):
    doc = _manifest(tiny_bundle)
    edit(doc)
    with pytest.raises(ManifestError, match=message):
        Manifest.parse(doc)


def test_a_failing_parity_gate_writes_no_bundle(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(parity, "FP32_MAX_ABS", 0.0)  # any difference at all now fails the fp32 gate
    out = tmp_path / "refused"
    with pytest.raises(ParityError, match=r"max \|Δ\|.*> 0.*no bundle was written"):
        export_run(tiny_run, out, ExportOptions(**QUICK))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_reduced_precision_is_gated_on_top1_agreement(tiny_run, tmp_path, monkeypatch):
    fp16 = export_run(tiny_run, tmp_path / "fp16", ExportOptions(precision="fp16", **QUICK))
    m = _manifest(fp16)
    report = m["parity"]["checks"]["end_to_end_fp16"]
    assert report["passed"] and min(report["top1_agreement"].values()) >= 0.99
    assert m["default_precision"] == "fp16" and Bundle(fp16).tower().precision == "fp16"
    assert Bundle(fp16).tower("fp32").precision == "fp32"
    monkeypatch.setattr(parity, "REDUCED_MIN_AGREEMENT", 1.01)
    with pytest.raises(ParityError, match="end_to_end_int8: .*top-1 agreement"):
        export_run(tiny_run, tmp_path / "int8", ExportOptions(precision="int8", **QUICK))
    monkeypatch.setattr(parity, "REDUCED_MIN_AGREEMENT", 0.0)
    int8 = export_run(tiny_run, tmp_path / "int8", ExportOptions(precision="int8", **QUICK))
    m = _manifest(int8)
    assert set(m["towers"]["image"]["variants"]) == {"onnx-fp32", "onnx-int8"}
    assert m["parity"]["checks"]["end_to_end_int8"]["max_abs_diff"]["new_logits"] > 0  # the drop is recorded
    assert m["parity"]["checks"]["tower_int8"]["min_cosine"] < 1.0


def test_export_refuses_bad_requests(tiny_run, tiny_bundle, tmp_path):
    with pytest.raises(ExportError, match="already exists"):
        export_run(tiny_run, tiny_bundle, ExportOptions(**QUICK))
    with pytest.raises(ExportError, match="bf16"):
        ExportOptions(precision="bf16")
    broken = tmp_path / "broken-run"
    shutil.copytree(tiny_run, broken)
    (broken / "plugin.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RunDirError, match="plugin.safetensors"):
        export_run(broken, tmp_path / "b", ExportOptions(**QUICK))
    with pytest.raises(ExportError, match="two distinct"):
        export_zero_shot("fvgpt-tiny", "none", ["cat"], tmp_path / "zs", ExportOptions(**QUICK))


def test_parity_set_is_deterministic_and_includes_real_photos(tiny_bundle):
    pre = Bundle(tiny_bundle).preprocess
    a, b = parity_pixels(pre, 8), parity_pixels(pre, 8)
    assert a.shape == (8 + len(photo_paths()), 3, 64, 64) and np.array_equal(a, b)


def test_tensorrt_engine(tiny_run, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU hosts only: pip install '.[gpu,trt]')")
    bundle = export_run(tiny_run, tmp_path / "trt", ExportOptions(precision="fp16", tensorrt=True, **QUICK))
    assert _manifest(bundle)["parity"]["checks"]["end_to_end_tensorrt_fp16"]["passed"]
    assert validate_bundle(bundle)["passed"]
