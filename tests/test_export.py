"""Export: bundles equal the torch model, keep a dynamic batch, gate their parity, and validate their files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import export.parity
from export.build import ExportError, ExportOptions, export_run, export_zero_shot
from export.bundle import Bundle, BundleError
from export.parity import ParityError, parity_set, parity_transform
from export.validate import validate_bundle
from fvgpt.classifier import FVGPTClassifier, ZeroShotClassifier, text_tables
from fvgpt.cli import main
from fvgpt.photos import photo_paths
from fvgpt.rundir import RunDirError, load_run

QUICK = dict(progress=False, parity_images=16)


@pytest.fixture(scope="module")
def reference(tiny_run, tiny_bundle):
    """The torch model the bundle was made from, and a batch of real photos preprocessed the open_clip way."""
    run = load_run(tiny_run, require_plugin=True)
    model = FVGPTClassifier(run.backbone, run.plugin, text_tables(run.backbone, run.classnames, run.ctx),
                            run.base_flags).eval()
    pixels = torch.stack([run.backbone.eval_transform(Image.open(p).convert("RGB")) for p in photo_paths()])
    pixels = torch.cat([pixels, torch.randn(4, *pixels.shape[1:])])
    return run, model, pixels


def test_export_writes_a_self_describing_bundle(tiny_bundle, tiny_run):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["kind"] == "fvgpt" and manifest["default_precision"] == "fp32"
    assert manifest["classes"] == json.loads((tiny_run / "classes.json").read_text())
    assert [c["base"] for c in manifest["classes"]] == [True] * 3 + [False] * 3
    assert set(manifest["files"]) == {"image.onnx", "text.onnx", "head.onnx", "tables.safetensors",
                                      "parity_reference.safetensors"}
    for key in ("preprocess", "tokenizer", "logit_scale", "opset", "prompts", "model", "run", "model_id"):
        assert key in manifest
    parity = manifest["parity"]
    assert parity["fp32"]["passed"] and parity["fp32"]["top1_agreement"] == {"base_logits": 1.0, "new_logits": 1.0}
    assert max(parity["fp32"]["max_abs_diff"].values()) <= 1e-3 and parity["text"]["max_abs_diff"] <= 1e-4


def test_bundle_equals_torch_heads_at_any_batch(tiny_bundle, reference):
    _, model, pixels = reference
    bundle = Bundle(tiny_bundle)
    with torch.no_grad():
        f, base, new = (t.numpy() for t in model(pixels))
    full = bundle.run_image(pixels.numpy())
    np.testing.assert_allclose(full["features"], f, atol=1e-5)
    np.testing.assert_allclose(full["base_logits"], base, atol=1e-4)
    np.testing.assert_allclose(full["new_logits"], new, atol=1e-4)
    for n in (1, 3):  # the batch axis is dynamic: the same image gives the same logits at batch 1, 3 and 8
        part = bundle.run_image(pixels[:n].numpy())
        np.testing.assert_allclose(part["new_logits"], full["new_logits"][:n], atol=1e-5)
        np.testing.assert_allclose(part["base_logits"], full["base_logits"][:n], atol=1e-5)


def test_new_labels_and_routing_match_the_torch_path(tiny_bundle, reference):
    run, model, pixels = reference
    bundle = Bundle(tiny_bundle)
    out = bundle.run_image(pixels.numpy())
    labels = ["orange star", "grey hexagon", run.classnames[0]]
    tuned, clip = bundle.label_features(labels)
    want = text_tables(run.backbone, labels, run.ctx)
    np.testing.assert_allclose(tuned, want.tuned.numpy(), atol=1e-5)
    np.testing.assert_allclose(clip, want.clip.numpy(), atol=1e-5)
    mixed = bundle.scores(out, labels)
    assert mixed.head == "new" and mixed.labels == labels
    f = torch.from_numpy(out["features"])
    s = run.backbone.logit_scale
    z_pc, _ = run.plugin.calibrate(s * f @ want.tuned.t(), s * f @ want.clip.t())
    np.testing.assert_allclose(mixed.logits, z_pc.detach().numpy(), atol=1e-4)
    base_names = [c for c, b in zip(run.classnames, run.base_flags) if b]
    subset = [base_names[2], base_names[0]]
    base = bundle.scores(out, subset)
    assert base.head == "base" and base.labels == subset
    np.testing.assert_allclose(base.logits, out["base_logits"][:, [2, 0]])
    assert bundle.scores(out).head == "new" and bundle.scores(out).labels == run.classnames


def test_zero_shot_bundle_matches_plain_clip(tiny_zero_shot_bundle):
    from fvgpt.backbone import load_backbone

    backbone = load_backbone("fvgpt-tiny", "none")
    bundle = Bundle(tiny_zero_shot_bundle)
    pixels = torch.randn(3, 3, 64, 64)
    model = ZeroShotClassifier(backbone, text_tables(backbone, bundle.classes, None)).eval()
    with torch.no_grad():
        _, logits = model(pixels)
    out = bundle.run_image(pixels.numpy())
    np.testing.assert_allclose(out["logits"], logits.numpy(), atol=1e-4)
    scores = bundle.scores(out, ["rocket", "zebra"])
    want = text_tables(backbone, ["rocket", "zebra"], None)
    feats = torch.from_numpy(out["features"])
    assert scores.head == "zero-shot"
    np.testing.assert_allclose(scores.logits, (backbone.logit_scale * feats @ want.clip.t()).numpy(), atol=1e-4)


def test_validate_passes_then_catches_a_tampered_file(tiny_bundle, tmp_path, capsys):
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


def test_a_failing_parity_gate_writes_no_bundle(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export.parity, "FP32_MAX_ABS", 0.0)  # any difference at all now fails the fp32 gate
    out = tmp_path / "refused"
    with pytest.raises(ParityError, match=r"max \|Δ\|.*> 0.*no bundle was written"):
        export_run(tiny_run, out, ExportOptions(**QUICK))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_reduced_precision_is_gated_on_top1_agreement(tiny_run, tmp_path, monkeypatch):
    fp16 = export_run(tiny_run, tmp_path / "fp16", ExportOptions(precision="fp16", **QUICK))
    report = json.loads((fp16 / "manifest.json").read_text())["parity"]["fp16"]
    assert report["passed"] and min(report["top1_agreement"].values()) >= 0.99
    assert Bundle(fp16).precision == "fp16" and Bundle(fp16, precision="fp32").precision == "fp32"
    monkeypatch.setattr(export.parity, "REDUCED_MIN_AGREEMENT", 1.01)
    with pytest.raises(ParityError, match="int8 image graph: .*top-1 agreement"):
        export_run(tiny_run, tmp_path / "int8", ExportOptions(precision="int8", **QUICK))
    monkeypatch.setattr(export.parity, "REDUCED_MIN_AGREEMENT", 0.0)
    int8 = export_run(tiny_run, tmp_path / "int8", ExportOptions(precision="int8", **QUICK))
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert set(manifest["graphs"]["image"]) == {"fp32", "int8"}
    assert manifest["parity"]["int8"]["max_abs_diff"]["new_logits"] > 0  # the drop is measured and recorded


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
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    a = parity_set(parity_transform(manifest["preprocess"]), 8)
    b = parity_set(parity_transform(manifest["preprocess"]), 8)
    assert a.shape == (8 + len(photo_paths()), 3, 64, 64) and np.array_equal(a, b)


def test_tensorrt_engine(tiny_run, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU hosts only: pip install '.[gpu,trt]')")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    bundle = export_run(tiny_run, tmp_path / "trt", ExportOptions(precision="fp16", tensorrt=True, **QUICK))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["tensorrt_fp16"]["passed"]
    assert validate_bundle(bundle)["passed"]
