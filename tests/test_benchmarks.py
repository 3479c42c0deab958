"""benchmarks/throughput.py and benchmarks/http_load.py on the tiny bundles, with tiny iteration counts.

http_load is the thing under test, so most of its tests run against a stdlib test double of `POST /classify`;
one test runs it against the real `fvgpt serve`.
"""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from conftest import needs_torch
from fvgpt_serving.process import free_port, stop, wait_ready

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
THROUGHPUT_ROW = {"runtime", "engine", "precision", "provider", "batch_size", "threads", "iters", "images_per_s",
                  "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "gflops_per_s", "ratio_to_baseline",
                  "preprocess_ms_per_image", "model_ms_per_image", "heads_ms_per_image", "pipeline_images_per_s"}
HTTP_ROW = {"concurrency", "requests", "ok", "errors", "images_per_s", "latency_ms_p50", "latency_ms_p95",
            "latency_ms_p99", "ratio_to_model_only"}


def bench(*args: str, script: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a benchmark the way a user does: `python -m benchmarks.X` (or `python benchmarks/X.py`)."""
    name, *rest = args
    cmd = [sys.executable, f"benchmarks/{name}.py"] if script else [sys.executable, "-m", f"benchmarks.{name}"]
    return subprocess.run(cmd + rest, cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ---- throughput -------------------------------------------------------------------------------------------------
def check_throughput_report(out: Path) -> dict:
    report = json.loads((out / "throughput.json").read_text())
    for key in ("command", "machine", "versions", "settings", "bundle", "baseline", "flops_per_image", "results",
                "skipped"):
        assert key in report, key
    assert report["machine"]["cpu"] and report["machine"]["cpu_cores_logical"] >= 1
    assert report["versions"]["torch"] and report["versions"]["onnxruntime"]
    assert report["bundle"]["fingerprint_checked"] and report["flops_per_image"] > 0
    rows = report["results"]
    for row in rows:
        assert THROUGHPUT_ROW <= set(row)
        for key in ("images_per_s", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "gflops_per_s",
                    "ratio_to_baseline", "preprocess_ms_per_image", "model_ms_per_image", "pipeline_images_per_s"):
            assert row[key] > 0, (row["runtime"], key)
        assert row["latency_ms_p50"] <= row["latency_ms_p99"]
    assert {r["ratio_to_baseline"] for r in rows if r["runtime"] == "eager-fp32"} == {1.0}
    with open(out / "throughput.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and THROUGHPUT_ROW <= set(table[0])
    png = out / "throughput.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 400
    return report


@needs_torch  # the baseline is open_clip eager
def test_throughput_zero_shot_bundle(tiny_zero_shot_bundle, tmp_path):
    res = bench("throughput", "--bundle", str(tiny_zero_shot_bundle), "--batch-sizes", "1,2", "--iters", "2",
                "--warmup", "1", "--threads", "1", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    report = check_throughput_report(tmp_path)
    names = {r["runtime"] for r in report["results"]}
    assert {"eager-fp32", "onnx-fp32"} <= names
    assert {(r["runtime"], r["batch_size"]) for r in report["results"]} == {(n, b) for n in names for b in (1, 2)}
    assert report["settings"]["threads"] == 1 and "benchmarks.throughput" in report["command"]
    assert "| onnx-fp32 |" in res.stdout  # the table printed for the reader


@needs_torch
def test_throughput_fvgpt_bundle_as_script(tiny_bundle, tmp_path):
    res = bench("throughput", "--bundle", str(tiny_bundle), "--runtimes", "onnx-fp32,onnx-int8,tensorrt-fp16",
                "--batch-sizes", "2", "--iters", "2", "--warmup", "1", "--threads", "1", "--out", str(tmp_path),
                script=True)
    assert res.returncode == 0, res.stderr
    report = check_throughput_report(tmp_path)
    assert [r["runtime"] for r in report["results"]] == ["eager-fp32", "onnx-fp32"]  # the baseline is always run
    onnx = report["results"][1]
    assert onnx["heads_ms_per_image"] > 0 and onnx["parity_top1_agreement"] == 1.0
    skipped = {s["runtime"]: s["reason"] for s in report["skipped"]}
    assert "no onnx-int8 tower graph" in skipped["onnx-int8"] and "TensorRT" in skipped["tensorrt-fp16"]
    assert "skipping onnx-int8" in res.stderr and "skipped onnx-int8: the bundle has no onnx-int8" in res.stdout


def test_throughput_openvino_rows_and_the_served_tower(tiny_openvino_bundle, tmp_path):
    from fvgpt_runtime.manifest import Manifest
    from fvgpt_runtime.tuning import choose

    res = bench("throughput", "--bundle", str(tiny_openvino_bundle), "--runtimes", "onnx-int8,openvino-int8",
                "--batch-sizes", "2", "--iters", "2", "--warmup", "1", "--threads", "1", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    report = check_throughput_report(tmp_path)
    rows = {r["runtime"]: r for r in report["results"]}
    assert rows["openvino-int8"]["engine"] == "openvino" and rows["openvino-int8"]["provider"] == "OpenVINO CPU"
    assert rows["openvino-int8"]["parity_top1_agreement"] >= 0.99
    assert report["machine"]["cpu_family"] is not None and "openvino" in report["versions"]
    # what `fvgpt serve` runs here, with or without a profile
    choice = choose(tiny_openvino_bundle, Manifest.read(tiny_openvino_bundle))
    tuning = report["tuning"]
    assert tuning["served"] == f"{choice.runtime}-{choice.precision}" and tuning["batch_size"] == 2
    assert tuning["images_per_s"] == rows[tuning["served"]]["images_per_s"]
    fastest = max(("onnx-int8", "openvino-int8"), key=lambda n: rows[n]["images_per_s"])
    assert tuning["fastest"] == fastest
    assert tuning["ratio_to_fastest"] == pytest.approx(tuning["images_per_s"] / rows[fastest]["images_per_s"])
    assert f"fvgpt serve runs {tuning['served']} on this host" in res.stdout


def test_throughput_bad_bundle_path(tmp_path):
    missing = tmp_path / "no-such-bundle"
    res = bench("throughput", "--bundle", str(missing), "--out", str(tmp_path))
    assert res.returncode != 0 and str(missing) in res.stderr and "Traceback" not in res.stderr


def test_throughput_not_a_bundle(tmp_path, capsys):
    from benchmarks import throughput

    (tmp_path / "empty").mkdir()
    assert throughput.main(["--bundle", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    assert f"{tmp_path / 'empty'} is not a bundle" in capsys.readouterr().err
    assert not (tmp_path / "throughput.json").exists()


def test_throughput_plot_is_optional(tmp_path, monkeypatch):
    from benchmarks import throughput

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert "matplotlib is not installed" in throughput.plot([], tmp_path / "x.png", "title")
    assert not (tmp_path / "x.png").exists()


# ---- http_load against a test double --------------------------------------------------------------------------
class ClassifyDouble(BaseHTTPRequestHandler):
    """`POST /classify` taking multipart JPEGs in the `images` field; every `fail_every`-th request answers 500."""

    protocol_version = "HTTP/1.1"  # keep-alive, as a real service
    seen: list[int] = []  # photos per request, in arrival order (each fixture gets its own list)
    fail_every = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        boundary = re.search(r"boundary=(\S+)", self.headers.get("Content-Type", ""))
        images = body.count(b'name="images"') if boundary else 0
        ok = self.path == "/classify" and images and body.count(b"\xff\xd8\xff") == images
        with self.lock:
            self.seen.append(images)
            failing = self.fail_every and len(self.seen) % self.fail_every == 0
        status = 404 if self.path != "/classify" else 400 if not ok else 500 if failing else 200
        payload = json.dumps([{"label": "cat", "score": 0.9}] * images if status == 200 else {"error": status})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def double():
    handler = type("Double", (ClassifyDouble,), {"seen": [], "fail_every": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def check_http_report(out: Path) -> dict:
    report = json.loads((out / "http_load.json").read_text())
    for key in ("command", "machine", "versions", "settings", "model_only", "results"):
        assert key in report, key
    for row in report["results"]:
        assert HTTP_ROW <= set(row)
    with open(out / "http_load.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(report["results"])
    return report


def test_http_load_against_double(double, tiny_zero_shot_bundle, tmp_path):
    handler, url = double
    res = bench("http_load", "--url", url, "--concurrency", "1,4", "--requests", "12", "--warmup", "2",
                "--bundle", str(tiny_zero_shot_bundle), "--model-batch", "2", "--model-iters", "2",
                "--out", str(tmp_path), script=True)
    assert res.returncode == 0, res.stderr
    report = check_http_report(tmp_path)
    assert [r["concurrency"] for r in report["results"]] == [1, 4]
    for row in report["results"]:
        assert row["ok"] == 12 and row["errors"] == 0
        for key in ("images_per_s", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "ratio_to_model_only"):
            assert row[key] > 0, key
    ref = report["model_only"]
    assert ref["batch"] == 2 and ref["before_images_per_s"] > 0 and ref["after_images_per_s"] > 0
    assert (ref["runtime"], ref["precision"]) == ("onnx", "fp32")  # no tuning profile: what serve runs by default
    assert handler.seen == [1] * (2 + 24)  # warm-up + both levels, one photo each, nothing more


def test_http_load_counts_errors(double, tmp_path):
    from benchmarks import http_load

    handler, url = double
    handler.fail_every = 3
    code = http_load.main(["--url", url + "/", "--concurrency", "2", "--requests", "9", "--warmup", "1",
                           "--images-per-request", "2", "--out", str(tmp_path)])
    assert code == 0
    row = check_http_report(tmp_path)["results"][0]
    assert (row["requests"], row["errors"], row["ok"]) == (9, 3, 6) and "http 500 x3" in row["error_kinds"]
    assert row["images_per_s"] > 0 and row["ratio_to_model_only"] is None
    assert handler.seen == [2] * 10


def test_http_load_wrong_endpoint_fails_fast(double, tmp_path, capsys):
    from benchmarks import http_load

    _, url = double
    assert http_load.main(["--url", url + "/nope", "--out", str(tmp_path)]) == 2
    assert "answered 404" in capsys.readouterr().err and not (tmp_path / "http_load.json").exists()


def test_http_load_unreachable_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    res = bench("http_load", "--url", url, "--out", str(tmp_path), timeout=30)
    assert res.returncode != 0 and f"cannot reach {url}" in res.stderr and "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("url", ["http://192.0.2.1:3000", "http://example.com", "http://10.0.0.1", "https://[::1]:1"])
def test_http_load_refuses_non_loopback(url, tmp_path, capsys):
    from benchmarks import http_load

    assert http_load.main(["--url", url, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("loopback" in err or "http://" in err) and url.split("//")[1].split(":")[0].strip("[]") in err


# ---- http_load against the real service ---------------------------------------------------------------------
@pytest.mark.slow
def test_http_load_against_fvgpt_serve(tiny_zero_shot_bundle, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "fvgpt.cli", "serve", str(tiny_zero_shot_bundle),
                                   "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_ready(server, url, 60)
            res = bench("http_load", "--url", url, "--concurrency", "1,2", "--requests", "6", "--warmup", "1",
                        "--bundle", str(tiny_zero_shot_bundle), "--model-batch", "2", "--model-iters", "2",
                        "--out", str(tmp_path))
            assert res.returncode == 0, res.stderr
            for row in check_http_report(tmp_path)["results"]:
                assert row["errors"] == 0 and row["images_per_s"] > 0 and row["ratio_to_model_only"] > 0
        finally:
            stop(server)  # by PID; its own process group holds the workers BentoML starts


# ---- model_repository -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_model_repository_generates_valid_bundles_and_measures_a_server(generated_repository, tmp_path):
    from fvgpt_export.validate import validate_bundle
    from fvgpt_runtime.manifest import Manifest

    base, derived = (Manifest.read(generated_repository / f"clf-000{i}" / "1") for i in (0, 1))
    assert derived.tower_id == base.tower_id and derived.model_id != base.model_id
    assert derived.classes != base.classes and derived.parity["derived_from"] == base.model_id
    assert (generated_repository / "clf-0001/1/tower.fp32.onnx").stat().st_ino == \
        (generated_repository / "clf-0000/1/tower.fp32.onnx").stat().st_ino  # shared by a hard link
    report = validate_bundle(generated_repository / "clf-0001" / "1")  # every parity check, tower included
    assert report["passed"], report

    res = bench("model_repository", "run", "--repository", str(generated_repository), "--sizes", "1,2",
                "--concurrency", "2", "--requests", "6", "--duration", "10", "--pickups", "1", "--poll", "0.5",
                "--work", str(tmp_path), "--out", str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "model_repository.json").read_text())
    assert [r["classifiers"] for r in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["one_errors"] == row["all_errors"] == 0 and row["one_requests"] == row["all_requests"] == 6
        assert row["one_images_per_s"] > 0 and row["all_images_per_s"] > 0 and row["load_s"] > 0
        assert row["rss_api_mib"] > 0 and row["rss_tower_mib"] > 0 and row["pickups"] == 1
        assert 0 < row["pickup_s_max"] < 30
    assert report["results"][0]["rss_per_added_classifier_mib"] is None
    assert report["results"][1]["rss_per_added_classifier_mib"] is not None
    assert report["repository"]["tower_id"] == base.tower_id and "| K |" in res.stdout


def test_cpu_breakdown_counts_samples_to_stages_per_process():
    """py-spy's raw lines → samples per stage per sampled process: the innermost frame naming a stage decides, an
    innermost wait is idle (dropped), the process is the last of the chain, and a frame naming nothing is "other"."""
    from benchmarks.cpu_breakdown import OTHER, parse_raw

    api = "process 10:bentoml serve;process 11:python -m _bentoml_impl.worker.service"
    tower = "process 10:bentoml serve;process 12:python -m fvgpt_serving.engine.tower_worker --fd 3"
    raw = "\n".join([
        (f"{api};run (asyncio/events.py:80);decode_slice (serving/engine/decode.py:90);"
         "preprocess (runtime/preprocess.py:40) 7"),
        f"{api};run (asyncio/events.py:80);decode_slice (serving/engine/decode.py:90) 3",
        f"{api};_worker (concurrent/futures/thread.py:90);get (queue.py:171) 50",  # a waiting thread: dropped
        f"{api};main (mine.py:1);helper (mine.py:2) 2",
        f"{tower};main (tower_worker.py:150);recv (multiprocessing/connection.py:250) 4",
        "garbage line without a count",
    ])
    assert parse_raw(raw) == {11: {"preprocess": 7, "decode": 3, OTHER: 2}, 12: {"transport": 4}}


def test_mixed_repository_counts_and_times_the_shared_graphs(tiny_bundle, promptsrc_bundle, mmrl_bundle, tmp_path):
    """benchmarks.mixed_repository on the session's CoOp, PromptSRC and MMRL bundles (placed where its generator
    would write them, with their blocks per role): graph runs per image 1, 2, 3 alone and 5 together; passes by blocks
    (tiny model: 2 blocks, MMRL's trunk 1) 1, 2, 1.5 and 3.5 together against 4.5 summed; images/s the inverse of the
    time per image; the mix's time against the sum of the three alone."""
    out = tmp_path / "mixed"
    (out / "bundles").mkdir(parents=True)
    for name, path in (("coop", tiny_bundle), ("promptsrc", promptsrc_bundle), ("mmrl", mmrl_bundle)):
        (out / "bundles" / name).symlink_to(path)
    facts = {"coop": {"blocks": {"image": 2}, "training_passes": 2.0},
             "promptsrc": {"blocks": {"image": 2, "promptsrc": 2}, "training_passes": 3.0},
             "mmrl": {"blocks": {"trunk": 1, "image": 1, "mmrl": 1}, "training_passes": 2.5}}
    (out / "bundles" / "facts.json").write_text(json.dumps(facts))
    assert bench("mixed_repository", "--out", str(out), "--model", "fvgpt-tiny", "--precision", "fp32", "--batch",
                 "2", "--rounds", "2", "--threads", "1").returncode == 0
    doc = json.loads((out / "mixed_repository.json").read_text())
    rows = {r["config"]: r for r in doc["rows"]}
    assert {k: r["graph_runs_per_image"] for k, r in rows.items()} == {"coop": 1, "promptsrc": 2, "mmrl": 3, "mix": 5}
    assert {k: r["passes_by_blocks"] for k, r in rows.items()} == {"coop": 1, "promptsrc": 2, "mmrl": 1.5, "mix": 3.5}
    assert (doc["mix_vs_sum"]["passes_mix"], doc["mix_vs_sum"]["passes_sum"]) == (3.5, 4.5)
    for r in rows.values():
        assert r["images_per_s"] == pytest.approx(1000 / r["ms_per_image"], rel=1e-3)
    alone = sum(rows[k]["ms_per_image"] for k in ("coop", "promptsrc", "mmrl"))
    assert doc["mix_vs_sum"]["ratio"] == pytest.approx(rows["mix"]["ms_per_image"] / alone, rel=1e-3)
    assert rows["coop"]["passes_by_graph_time"] == 1 and doc["training_passes"]["promptsrc"] == 3.0
    assert (out / "mixed_repository.csv").read_text().startswith("config,classifiers,graph_runs_per_image")
