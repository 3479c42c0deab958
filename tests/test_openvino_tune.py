"""OpenVINO tower variants, batch independence of every variant, and `fvgpt tune` → tuning profile → `fvgpt serve`,
on the tiny model: real ONNX Runtime, OpenVINO, NNCF and a real `bentoml serve` on loopback."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fvgpt.cli import main
from fvgpt.photos import photo_paths
from fvgpt.world import ALL_KINDS, SCENES, render
from fvgpt.rundir import load_run
from fvgpt_export import build, parity
from fvgpt_export.build import ExportOptions, export_run
from fvgpt_export.parity import ParityError
from fvgpt_export.validate import validate_bundle
from fvgpt_runtime.bundle import Bundle, softmax
from fvgpt_runtime.host import host_facts
from fvgpt_runtime.manifest import MANIFEST, Manifest
from fvgpt_runtime.openvino import unsupported
from fvgpt_runtime.preprocess import preprocess
from fvgpt_runtime.tuning import PROFILE, choose, read_profile
from fvgpt_serving.cli import server_command
from fvgpt_serving.process import free_port, stop, wait_ready

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install '.[openvino]')")
QUICK = {"progress": False, "parity_images": 16, "calibration_images": 16}
BF16 = unsupported("bf16") is None


def _manifest(bundle) -> dict:
    return json.loads((bundle / MANIFEST).read_text())


@pytest.fixture(scope="module")
def images(tiny_openvino_bundle) -> np.ndarray:
    """Eight fresh world images (another seed than the task's, so not the parity set), preprocessed the bundle's
    way: the inputs the micro-CLIP was made for."""
    pre = Bundle(tiny_openvino_bundle).preprocess
    kinds, scenes = ALL_KINDS[::31][:8], SCENES[:8]
    return np.stack([preprocess(Image.fromarray(render(k, s, 64, (99, i))[0]), pre)
                     for i, (k, s) in enumerate(zip(kinds, scenes))]).astype(np.float32)


def test_openvino_variants_pass_the_gate_and_match_torch(tiny_openvino_bundle, world_run, images):
    m = _manifest(tiny_openvino_bundle)
    variants = m["towers"]["image"]["variants"]
    expected = {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"} | ({"openvino-bf16"} if BF16 else set())
    assert set(variants) == expected
    assert variants["openvino-int8"]["file"] == "tower.openvino-int8.xml"
    assert {"tower.openvino-int8.xml", "tower.openvino-int8.bin"} <= set(m["files"])
    assert len({v["id"] for v in variants.values()}) == len(variants)  # each variant its own tower_id
    checks = m["parity"]["checks"]
    for name in ("openvino_fp32", "openvino_int8") + (("openvino_bf16",) if BF16 else ()):
        for kind in ("tower", "end_to_end", "batch_independence"):
            assert checks[f"{kind}_{name}"]["passed"], (kind, name)
    assert m["parity"]["refused"] == {} and validate_bundle(tiny_openvino_bundle)["passed"]

    model = load_run(world_run, require_plugin=True).model
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(images)).numpy()
    bundle = Bundle(tiny_openvino_bundle)

    def cosine(precision: str) -> float:
        got = bundle.tower(precision, "openvino")(images)
        return float(((got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)).min())

    np.testing.assert_allclose(bundle.tower("fp32", "openvino")(images), want, atol=1e-5)
    assert cosine("int8") > 0.98
    if BF16:
        assert 0.999 < cosine("bf16") < 1 - 1e-7  # really bf16: close to fp32, not equal


def test_every_variant_is_batch_independent(tiny_openvino_bundle, images):
    """The same image alone and among 7 others: identical ranking, probabilities within 1e-5, both heads."""
    bundle = Bundle(tiny_openvino_bundle)
    base = bundle.classes.base_names
    for graph in bundle.manifest.towers["image"].variants.values():
        tower = bundle.tower(graph.precision, graph.runtime)
        together = tower(images)
        for i in (0, 3, 7):
            alone = tower(images[i:i + 1])
            for labels in (None, base):
                p_batch = bundle.scores(together[i:i + 1], labels).probabilities
                p_alone = bundle.scores(alone, labels).probabilities
                assert np.abs(p_batch - p_alone).max() <= 1e-5, (graph.key, i, labels)
                assert (np.argsort(-p_batch) == np.argsort(-p_alone)).all(), (graph.key, i, labels)


def _dynamic_int8(src, dst) -> None:
    """The int8 this project wrote before: ONNX Runtime's dynamic quantisation, one activation scale per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])


def test_the_gate_refuses_a_batch_dependent_int8(tiny_run, tmp_path, monkeypatch):
    """Issue 13, finding 1: dynamic int8 lets one image move another's answer; the gate refuses to write it."""
    monkeypatch.setattr(build, "quantize_int8", _dynamic_int8)
    out = tmp_path / "dynamic"
    with pytest.raises(ParityError, match=r"batch_independence_int8: .*probabilities alone vs in a batch of 16 "
                                          r"differ by .* > 1e-05.*no bundle was written"):
        export_run(tiny_run, out, ExportOptions(precision="int8", **QUICK))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_gate_leaves_out_a_failing_openvino_variant(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(parity, "REDUCED_MIN_AGREEMENT", 1.01)  # no reduced-precision variant can pass now
    bundle = export_run(tiny_run, tmp_path / "b", ExportOptions(openvino=True, **QUICK))
    m = _manifest(bundle)
    assert set(m["towers"]["image"]["variants"]) == {"onnx-fp32", "openvino-fp32"}  # fp32 is gated on |Δ|
    refused = m["parity"]["refused"]
    assert set(refused) == {"openvino-int8"} | ({"openvino-bf16"} if BF16 else set())
    assert "top-1 agreement" in refused["openvino-int8"]["end_to_end_openvino_int8"][0]
    assert not (bundle / "tower.openvino-int8.xml").exists() and not (bundle / "tower.openvino-int8.bin").exists()
    assert validate_bundle(bundle)["passed"]


@pytest.fixture(scope="module")
def tuned(tiny_openvino_bundle) -> dict:
    """`fvgpt tune` restricted to OpenVINO int8, so its choice differs from the safe default (ONNX Runtime int8)."""
    assert main(["tune", str(tiny_openvino_bundle), "--batch-sizes", "1,2", "--iters", "2", "--warmup", "1",
                 "--runtimes", "openvino", "--precisions", "int8", "--quiet"]) == 0
    return read_profile(tiny_openvino_bundle)


def test_tune_writes_a_profile_for_this_host(tuned, tiny_openvino_bundle):
    assert tuned["host"] == host_facts() and tuned["host"]["cpu_family"] is not None
    assert tuned["model_id"] == Bundle(tiny_openvino_bundle).model_id
    [candidate] = tuned["candidates"]
    assert candidate["name"] == "openvino-int8" and candidate["provider"] == "OpenVINO CPU"
    assert candidate["gate"]["passed"] and candidate["gate"]["batch_max_probability_diff"] <= 1e-5
    assert [r["batch_size"] for r in candidate["results"]] == [1, 2]
    assert all(r["images_per_s"] > 0 and r["latency_ms_p50"] > 0 for r in candidate["results"])
    assert tuned["choice"]["name"] == "openvino-int8" and tuned["choice"]["batch_size"] == 2
    skipped = tuned["skipped"]
    assert "left out by --runtimes" in skipped["onnx-int8"] and "left out by --precisions" in skipped["openvino-fp32"]
    # the GPU candidates are absent on this host, each with its reason
    assert "CUDAExecutionProvider" in skipped["onnx-cuda"] and "TensorRT engine" in skipped["tensorrt"]
    assert "torch-free" in skipped["torch.compile"]


def test_the_profile_is_used_and_ignored_on_a_mismatch(tuned, tiny_openvino_bundle):
    bundle = (tiny_openvino_bundle, Manifest.read(tiny_openvino_bundle))
    choice = choose(*bundle)
    assert (choice.runtime, choice.precision) == ("openvino", "int8") and "tuning profile" in choice.reason
    other_host = json.loads(json.dumps(tuned))
    other_host["host"]["cpu_family"] = 25 if tuned["host"]["cpu_family"] != 25 else 26
    default = choose(*bundle, profile=other_host)
    assert (default.runtime, default.precision) == ("onnx", "int8")
    assert "another host (cpu_family" in default.reason and "fvgpt tune" in default.reason
    other_graph = json.loads(json.dumps(tuned))
    other_graph["candidates"][0]["tower_id"] = "tower-0000000000000000"
    assert "other tower graphs" in choose(*bundle, profile=other_graph).reason
    # --runtime/--precision narrow the profile's choice; what it did not measure falls back to the safe default
    assert choose(*bundle, "openvino").precision == "int8"
    onnx = choose(*bundle, "onnx")
    assert (onnx.runtime, onnx.precision) == ("onnx", "int8") and "measured no onnx candidate" in onnx.reason
    # a broken profile never stops a server: the safe default runs, and the log says why
    no_choice = {k: v for k, v in tuned.items() if k != "choice"}
    assert "tuning profile malformed (KeyError" in choose(*bundle, profile=no_choice).reason


def test_tune_weighs_speed_against_accuracy_on_every_candidate(tiny_openvino_bundle, tmp_path):
    """Issue 21.5, one real tune over every candidate: the choice, and serve's choice narrowed to a runtime, are what
    the rule gives on the profile's own figures (the rule restated here: the fastest candidate at least 1.15x as
    fast as every candidate whose measured logit error is 1.5x smaller, errors under 1e-3 counting as 1e-3)."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_openvino_bundle, copy)
    (copy / PROFILE).unlink(missing_ok=True)
    assert main(["tune", str(copy), "--batch-sizes", "1,2", "--iters", "2", "--warmup", "1", "--quiet"]) == 0
    profile = read_profile(copy)
    measured = profile["candidates"]
    assert {c["name"] for c in measured} >= {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"}
    for c in measured:  # every gate records the figures the rule ranks by, from the parity checks on this host
        assert c["gate"]["passed"] and 0 <= c["gate"]["logit_error"] and 0 <= c["gate"]["mean_kl"]

    def rate(c: dict) -> float:
        return next(r["images_per_s"] for r in c["results"] if r["batch_size"] == 2)

    def expected(cands: list[dict]) -> str:
        error = {c["name"]: max(c["gate"]["logit_error"], 1e-3) for c in cands}
        fine = [c for c in cands if all(rate(c) >= 1.15 * rate(d) for d in cands
                                        if error[d["name"]] * 1.5 < error[c["name"]])]
        return max(fine, key=rate)["name"]

    choice = profile["choice"]
    assert choice["name"] == expected(measured) and choice["prefer"] == "balanced"
    assert choice["rule"] == {"speed_margin": 1.15, "accuracy_factor": 1.5, "exact_logit_error": 1e-3}
    assert choice["why"].startswith(f"{choice['name']}: ") and "--prefer balanced" in choice["why"]
    manifest = Manifest.read(copy)
    served = choose(copy, manifest)
    assert f"{served.runtime}-{served.precision}" == choice["name"] and "its choice" in served.reason
    openvino = choose(copy, manifest, "openvino")
    assert f"openvino-{openvino.precision}" == expected([c for c in measured if c["runtime"] == "openvino"])
    assert main(["tune", str(copy), "--batch-sizes", "1,2", "--iters", "2", "--warmup", "1", "--quiet",
                 "--prefer", "speed"]) == 0
    fastest = read_profile(copy)
    assert fastest["choice"]["name"] == max(fastest["candidates"], key=rate)["name"]


def test_a_broken_profile_falls_back_to_the_safe_default(tiny_openvino_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_openvino_bundle, copy)
    (copy / PROFILE).write_text("{ not json")
    choice = choose(copy, Manifest.read(copy))
    assert (choice.runtime, choice.precision) == ("onnx", "int8") and "tuning profile unusable" in choice.reason


@pytest.mark.slow
def test_serve_runs_the_tuned_tower(tuned, tiny_openvino_bundle, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_")} | {
        "FVGPT_BUNDLE": str(tiny_openvino_bundle), "FVGPT_MAX_BATCH_SIZE": "4"}
    with open(tmp_path / "serve.log", "w+") as log:
        server = subprocess.Popen(server_command("127.0.0.1", port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            wait_ready(server, url, 120)
            tower = httpx.get(f"{url}/info", timeout=30).json()["tower"]
            photos = [p.read_bytes() for p in photo_paths()]

            def classify(i: int) -> list[dict]:
                files = [("images", ("p.jpg", photos[i % len(photos)], "image/jpeg"))]
                return httpx.post(f"{url}/classify", files=files, timeout=60).json()["results"][0]["predictions"]

            with ThreadPoolExecutor(8) as pool:  # concurrent requests share batches of the tuned tower
                answers = list(pool.map(classify, range(24)))
        finally:
            stop(server)
        log.seek(0)
        assert "tuning profile" in log.read()
    bundle = Bundle(tiny_openvino_bundle)
    assert (tower["runtime"], tower["precision"]) == ("openvino", "int8")
    assert tower["tower_id"] == bundle.manifest.towers["image"].variants["openvino-int8"].id
    openvino_int8 = bundle.tower("int8", "openvino")
    for i, answer in enumerate(answers):  # each answer is what the image gets alone, whatever its batch mates
        pixels = preprocess(Image.open(io.BytesIO(photos[i % len(photos)])), bundle.preprocess)[None]
        scores = bundle.scores(openvino_int8(pixels))
        want = dict(zip(scores.labels, softmax(scores.logits)[0].tolist()))
        assert [p["label"] for p in answer] == sorted(want, key=want.get, reverse=True)[:len(answer)]
        assert max(abs(p["probability"] - want[p["label"]]) for p in answer) <= 1e-5


def test_tune_refuses_bad_requests(tiny_openvino_bundle, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_openvino_bundle, copy)
    (copy / PROFILE).unlink(missing_ok=True)
    assert main(["tune", str(copy), "--batch-sizes", "128", "--quiet"]) == 2
    assert "over the bundle's max batch" in capsys.readouterr().err
    assert main(["tune", str(copy), "--runtimes", "tensorrt", "--quiet"]) == 2
    assert "no candidate runs here" in capsys.readouterr().err and not (copy / PROFILE).exists()
    assert subprocess.run([sys.executable, "-m", "fvgpt.cli", "serve", str(copy), "--runtime", "tensorrt",
                           "--smoke-test"], capture_output=True, text=True, timeout=60,
                          check=False).returncode == 2
