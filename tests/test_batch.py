"""`fvgpt classify` run as a user runs it (the real CLI, a local Ray instance), its rows held to the Python API and to
the real server's POST /classify (same numbers, ≤ 1e-6, fp32 towers, any batch size), its error rows, usage errors,
and a real SIGINT: no Ray process left behind, finished shards kept, the re-run skips them and completes the job."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray", reason="`fvgpt classify` needs the `batch` extra (Ray Data, pyarrow), which this install "
                                  "lacks: pip install '.[cpu,serve,dev,batch]'")
import fvgpt_runtime as fr
import psutil
import pyarrow as pa
import pyarrow.csv  # noqa: F401 - pa.csv
import pyarrow.parquet as pq

from fvgpt.photos import photo_paths
from tests.serving_support import Server, running

pytestmark = pytest.mark.slow
BATCH = 3  # tower batches of 3: other groupings than the API's 1 and 32 below


def classify(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"FVGPT_PROGRESS_EVERY_S": "0"}
    return subprocess.run([sys.executable, "-m", "fvgpt", "classify", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_rows(out: Path) -> list[dict]:
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


@pytest.fixture(scope="module")
def job(tiny_bundle, tiny_bundle_seed2, tmp_path_factory):
    """Two classifiers on one tower over a folder (photos, a generated PNG, a corrupt file, a too-large image), a
    Parquet list of paths (one missing) and a Parquet column of image bytes."""
    root = tmp_path_factory.mktemp("batch")
    repo = root / "repo"
    shutil.copytree(tiny_bundle, repo / "pets" / "1")
    shutil.copytree(tiny_bundle_seed2, repo / "shapes" / "1")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i, p in enumerate(photo_paths()[:4]):
        shutil.copy(p, images / ("sub" if i % 2 else "") / p.name)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), np.uint8)).save(images / "noise.png")
    Image.new("L", (800, 800)).save(images / "huge.png")  # 640,000 pixels: over --max-image-pixels
    (images / "corrupt.jpg").write_bytes(photo_paths()[0].read_bytes()[:300])
    pq.write_table(pa.table({"path": ["images/noise.png", "images/gone.jpg"]}), root / "list.parquet")
    buf = io.BytesIO()
    Image.open(photo_paths()[2]).convert("RGB").save(buf, format="PNG")
    pq.write_table(pa.table({"image": pa.array([buf.getvalue(), photo_paths()[3].read_bytes()], pa.binary())}),
                   root / "bytes.parquet")
    out = root / "out"
    t0 = time.perf_counter()
    done = classify("--repository", str(repo), "--input", str(images), str(root / "list.parquet"),
                    str(root / "bytes.parquet"), "--out", str(out), "--shard-size", "4", "--batch-size", str(BATCH),
                    "--max-image-pixels", "500000")
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"fvgpt classify: {time.perf_counter() - t0:.1f} s")
    return {"root": root, "repo": repo, "out": out, "stdout": done.stdout, "stderr": done.stderr,
            "rows": read_rows(out)}


def source_bytes(path: str) -> bytes:
    if "#" in path and path.split("#")[0].endswith(".parquet"):
        table, row = path.rsplit("#", 1)
        return pq.read_table(table).column("image")[int(row)].as_py()
    return Path(path).read_bytes()


def test_rows_shards_errors_and_summary(job):
    rows, out = job["rows"], job["out"]
    images = 4 + 3 + 2 + 2  # the folder (sorted: 2 photos, corrupt, huge, noise, sub/2 photos), the list, the bytes
    assert [(r["index"], r["model"]) for r in rows] == [(i, m) for i in range(images) for m in ("pets", "shapes")]
    assert len(list(out.glob("part-*.parquet"))) == 3 and not list(out.glob(".*tmp"))
    errors = {Path(r["path"]).name: (r["error_kind"], r["error"]) for r in rows if r["error"]}
    assert set(errors) == {"corrupt.jpg", "huge.png", "gone.jpg"}
    assert errors["corrupt.jpg"][0] == "unreadable"
    assert "corrupt.jpg could not be read (Truncated" in errors["corrupt.jpg"][1]
    assert errors["huge.png"][0] == "oversized"
    assert "800×800 = 640000 pixels; the limit is 500000" in errors["huge.png"][1]
    assert errors["gone.jpg"] == ("missing", f"{job['root'] / 'images' / 'gone.jpg'} does not exist")
    assert all(r["labels"] is None and r["probabilities"] is None for r in rows if r["error"])
    summary = json.loads(job["stdout"].strip().splitlines()[-1])
    assert summary["images"] == images and summary["rows"] == 2 * images
    assert summary["errors"] == {"missing": 1, "oversized": 1, "unreadable": 1}
    towers = {r["tower_id"] for r in rows}
    assert len(towers) == 1  # one backbone: one tower variant for both classifiers
    meta = json.loads(pq.read_schema(out / "part-00000.parquet").metadata[b"fvgpt"])
    assert meta["batch_size"] == BATCH and {m["precision"] for m in meta["models"]} == {"fp32"}


def test_same_numbers_as_the_python_api_at_any_batch_size(job):
    rows = [r for r in job["rows"] if not r["error"]]
    for model in ("pets", "shapes"):
        clf = fr.load(job["repo"] / model)
        mine = [r for r in rows if r["model"] == model]
        data = [source_bytes(r["path"]) for r in mine]
        for batch_size in (1, 32):
            api = clf.classify(data, batch_size=batch_size)
            for r, a in zip(mine, api, strict=True):
                assert r["labels"] == [p.label for p in a.predictions] and r["head"] == a.head
                assert np.max(np.abs(np.array(r["probabilities"]) - [p.probability for p in a.predictions])) <= 1e-6


def test_same_numbers_as_post_classify(job, tmp_path):
    rows = [r for r in job["rows"] if not r["error"]]
    paths = sorted({r["path"] for r in rows})
    server = Server(job["repo"], tmp_path / "server.log", repository=True)
    with running(server):
        files = [("images", (f"img{i}", source_bytes(p), "application/octet-stream")) for i, p in enumerate(paths)]
        answer = server.post("/classify", files=files, data={"models": ["pets", "shapes"]})
    assert answer.status_code == 200, answer.text
    by_key = {(r["path"], r["model"]): r for r in rows}
    for path, image in zip(paths, answer.json()["results"], strict=True):
        for result in image["models"]:
            r = by_key[(path, result["model"])]
            assert r["labels"] == [p["label"] for p in result["predictions"]] and r["head"] == result["head"]
            assert max(abs(a - p["probability"]) for a, p in zip(r["probabilities"], result["predictions"])) <= 1e-6


def test_usage_errors_exit_2_before_ray_starts(job):
    out, repo = job["out"], job["repo"]
    changed = classify("--repository", str(repo), "--input", str(job["root"] / "images"), "--out", str(out),
                       "--top-k", "2", "--max-image-pixels", "500000", "--shard-size", "4")
    assert changed.returncode == 2 and "holds another job (it differs in: digest, items, top_k)" in changed.stderr
    for args, message in [(["--input", "/nonexistent/*.jpg"], "matches no file"),
                          (["--input", str(job["root"]), "--labels", "a,a"], "labels[1] 'a' repeats labels[0]"),
                          (["--input", str(job["root"] / "bytes.parquet"), "--column", "nope"], "has no column"),
                          (["--input", str(job["root"]), "--decode-tasks", "0"], "--decode-tasks must be at least 1")]:
        done = classify("--repository", str(repo), *args, "--out", str(job["root"] / "other"))
        assert done.returncode == 2 and message in done.stderr and "error: " in done.stderr, done.stderr[-2000:]


def test_sigint_leaves_no_ray_process_and_the_rerun_completes(tiny_bundle, tmp_path):
    images = tmp_path / "many"
    images.mkdir()
    rng = np.random.default_rng(1)
    n = 1500  # the job outlasts the signal: after its first blocks, 256 images each, it runs ~300 images/s
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(images / f"{i:05d}.png")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "fvgpt", "classify", str(tiny_bundle), "--input", str(images), "--out", str(out),
            "--shard-size", "25", "--batch-size", "2"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    ray_processes = psutil.Process(proc.pid).children(recursive=True)
    assert any("raylet" in p.name() for p in ray_processes)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr and "run the same command to continue" in stderr
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    kept = len(list(out.glob("part-*.parquet")))
    assert 1 <= kept < n // 25 and not list(out.glob(".*tmp"))
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skipping {kept} shard(s) already written ({kept * 25} of {n} images)" in done.stderr
    assert [r["index"] for r in read_rows(out)] == list(range(n))


def test_inputs_expand_in_a_fixed_order_and_csv_shards_hold_json_lists(tmp_path):
    from fvgpt_batch.inputs import InputsError, expand
    from fvgpt_batch.shards import write_atomic

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    for name in ("a/z.JPG", "a/b/y.png", "a/x.txt", "a/.h.png", "a/.hidden/w.png", "c.webp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.csv").write_text("path,other\na/x.txt,1\n/abs/q.png,2\n")
    items = expand([str(tmp_path / "a"), str(tmp_path / "*.webp"), str(tmp_path / "list.csv")])
    assert items.paths == [str(tmp_path / "a/z.JPG"), str(tmp_path / "a/b/y.png"), str(tmp_path / "c.webp"),
                           str(tmp_path / "a/x.txt"), "/abs/q.png"]
    assert items.digest() == expand([str(tmp_path / "a"), str(tmp_path / "*.webp"),
                                     str(tmp_path / "list.csv")]).digest() != expand([str(tmp_path / "a")]).digest()
    with pytest.raises(InputsError, match="has no column 'image'"):
        expand([str(tmp_path / "list.csv")], column="image")
    table = pa.table({"path": ["p"], "labels": pa.array([["a cat", "b,c"]]), "probabilities": [[0.75, 0.25]]})
    write_atomic(table, tmp_path / "part-00000.csv", "csv", {})
    lines = (tmp_path / "part-00000.csv").read_text().splitlines()
    assert json.loads(pa.csv.read_csv(tmp_path / "part-00000.csv").column("labels")[0].as_py()) == ["a cat", "b,c"]
    assert len(lines) == 2 and not list(tmp_path.glob(".*tmp"))


def two_photo_job(bundle: Path, tower_id: str | None = None) -> tuple:
    """The driver's inputs for two photos through `bundle` (as `fvgpt classify` resolves them), its tower id replaced
    by `tower_id` if given; and the classifier's tower id."""
    from fvgpt_batch.inputs import expand
    from fvgpt_batch.shards import JobRecord
    from fvgpt_batch.stages import Model
    from fvgpt_runtime.classifier import Classifier
    from fvgpt_runtime.repository import locate

    c = Classifier(locate(bundle))
    model = Model("pets", "1", str(bundle), c.info.model_id, tower_id or c.tower_id, c.choice.runtime,
                  c.choice.precision, None, 2)
    items = expand([str(p) for p in photo_paths()[:2]])
    record = JobRecord(items=len(items), digest=items.digest(), models=[{"name": "pets", "tower_id": model.tower_id}],
                       labels=None, top_k=2, all_probabilities=False, format="parquet", shard_size=4)
    return items, [model], record, c.tower_id


def test_a_failed_actor_stops_the_job_with_one_line_and_keeps_nothing_half_written(tiny_bundle, tmp_path):
    """An actor that cannot load its classifier (here: the bundle on its node is not the one the driver resolved, the
    check a cluster with diverging copies trips) ends the job with one line naming the cause, not Ray's traceback."""
    from fvgpt_batch.job import JobFailed, Settings, run

    items, models, record, tower_id = two_photo_job(tiny_bundle, "tower-elsewhere")
    with pytest.raises(JobFailed) as failed:
        run(items, models, record, tmp_path / "out", Settings(progress=False))
    message = str(failed.value)
    assert "\n" not in message and message.startswith("the job stopped: RuntimeError: pets@1 runs tower "), message
    assert f"{tower_id} on this node, tower-elsewhere on the driver" in message and "0 shard(s)" in message
    assert not list((tmp_path / "out").glob("part-*"))
    full = (tmp_path / "out" / "job-error.txt").read_text()  # the remote traceback, for whoever debugs it
    assert str(tmp_path / "out" / "job-error.txt") in message and "stages.py" in full and "RuntimeError: pets@1" in full


def test_actors_that_leave_no_cpu_for_decoding_stop_the_job_at_once(tiny_bundle, tmp_path):
    """Tower actors holding every CPU would stall the decode stage for good: the job says so before starting them."""
    from fvgpt_batch.job import JobFailed, Settings, run

    items, models, record, _ = two_photo_job(tiny_bundle)
    cpus = 4096.0  # more than any machine here has
    with pytest.raises(JobFailed) as failed:
        run(items, models, record, tmp_path / "out", Settings(actors=1, actor_cpus=cpus, progress=False))
    message = str(failed.value)
    assert message.startswith(f"1 tower actor(s) of {cpus} CPU each leave no CPU for decoding on this machine (")
    assert "use fewer --actors or a smaller --actor-cpus" in message and not list((tmp_path / "out").glob("part-*"))


def test_input_blocks_are_one_batch_first_then_large_within_the_pixel_budget():
    from fvgpt_batch.job import block_sizes

    vit = 3 * 224 * 224 * 4  # float32 pixels of one image: 64 MiB hold 111 of them → 96 in whole batches of 32
    assert block_sizes(1000, 2, 32, vit) == [32] * 8 + [96] * 7 + [72]
    assert block_sizes(1000, 1, 4, 3 * 32 * 32 * 4) == [4] * 4 + [256] * 3 + [216]  # small images: 256 per block
    assert block_sizes(10, 2, 4, vit) == [4, 4, 2]  # a job smaller than the first blocks
    assert block_sizes(100, 1, 8, 3 * 8192 * 8192 * 4) == [8] * 12 + [4]  # past the budget: one batch a block


def test_a_file_name_that_is_not_utf8_is_a_usage_error_naming_it(tmp_path):
    import re

    from fvgpt_batch.inputs import InputsError, expand

    folder = tmp_path / "latin1"
    folder.mkdir()
    shutil.copy(photo_paths()[0], os.path.join(os.fsencode(folder), b"caf\xe9.jpg"))  # Latin-1 é: not UTF-8
    with pytest.raises(InputsError, match=re.escape("caf\\xe9.jpg' is not UTF-8 text; rename it")):
        expand([str(folder)])
