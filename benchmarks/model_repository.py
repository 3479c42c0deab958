"""Many classifiers, one image tower: a generated model repository served by `fvgpt serve --repository`, measured over
HTTP on loopback.

    python -m benchmarks.model_repository generate --out runs/repo-tiny --count 1000 --model fvgpt-tiny
    python -m benchmarks.model_repository run --repository runs/repo-tiny --sizes 1,10,100,1000

generate: exports ONE FVG-PT bundle of a generated model (the backbone's weights, a random learned context and a
random plugin) with the full export and its parity gate, then derives the other classifiers from it, each with its
own classes (drawn from a word list), context and plugin: its own tables (the torch text encoder) and heads graph
(the base bundle's heads graph with this plugin's weights as initializers), gated by the heads and text parity checks
against torch. They share the base's tower, text graph and vocabulary through hard links, so a thousand ViT-B/16
classifiers take minutes and little disk. The result is DIR/clf-0000/1/ ... (re-running resumes).

run: for each size K, a server on a view of the first K classifiers (hard links again), and per K: the time until
all K are loaded and ready; the images/s of one-image requests at --concurrency when each names one random
classifier, and when each names all of them ("models": "*"); the RSS of the API and tower processes; the time a new
bundle renamed into the folder takes to be served. RSS per added classifier is the slope between the smallest and
each larger K. Writes model_repository.json and .csv.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

if not __package__:  # `python benchmarks/model_repository.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (BenchError, command_line, int_list, library_versions, load_average, machine_info,
                               photo_bytes, utc_now, write_outputs)
from benchmarks.http_load import check_service, multipart, parse_target, run_level

PREFIX = "clf"
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "brown", "pink", "teal")
THINGS = ("cat", "dog", "car", "truck", "bird", "boat", "chair", "table", "cup", "phone", "shoe", "bag", "lamp",
          "tree", "flower", "house", "bridge", "bottle", "clock", "guitar", "horse", "plane", "train", "rocket",
          "book", "kite", "pizza", "apple", "banana", "camera")
WORDS = [f"{c} {t}" for c in COLOURS for t in THINGS]  # 360 class names


# ---- generate ---------------------------------------------------------------------------------------------------

def classifier_dir(root: Path, i: int) -> Path:
    return root / f"{PREFIX}-{i:04d}" / "1"


def generated_model(backbone, cfg, i: int, seed: int, n_classes: int):
    """Classifier i: its classes, a random learned context and a random plugin, all from (seed, i)."""
    import torch

    from fvgpt.classes import ClassSplit
    from fvgpt.model import FVGPTModel

    names = random.Random(seed * 1_000_003 + i).sample(WORDS, n_classes)
    torch.manual_seed(seed * 1_000_003 + i)
    model = FVGPTModel.new_prompt(backbone, ClassSplit.paper(sorted(names)), cfg)
    with torch.no_grad():  # a trained-looking plugin: no weight left at its zero or identity start
        for param in model.new_plugin(backbone.logit_scale).parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return model.eval()


def derive(base: Path, model, out: Path) -> None:
    """A bundle for `model` that reuses the base bundle's tower, text graph and vocabulary (hard links) and gets its
    own tables and heads: the base heads graph with this model's plugin weights, checked against torch."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.numpy import load_file, save_file

    from fvgpt_export.build import HEADS_GRAPH, TABLES, bundle_tables, heads_reference, model_id_of
    from fvgpt_export.parity import PARITY_REFERENCE, check_bundle, gate
    from fvgpt_runtime.manifest import Manifest

    manifest = Manifest.read(base)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name in manifest.files:
            if name not in (HEADS_GRAPH, TABLES, PARITY_REFERENCE):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                os.link(base / name, tmp / name)
        tables = model.tables(list(model.classes.names))
        save_file(bundle_tables(model, tables), str(tmp / TABLES))
        graph = onnx.load(str(base / HEADS_GRAPH))
        # the graph holds the plugin's inference weights (image adapter, BRG); the text adapter is in the tables and
        # the FRG trains only. Every plugin weight in the graph is replaced; the parity check below proves the rest.
        weights = {f"model.plugin.{k}": v.detach().cpu().numpy() for k, v in model.plugin.state_dict().items()}
        plugin_inits = [init for init in graph.graph.initializer if init.name.startswith("model.plugin.")]
        if missing := [init.name for init in plugin_inits if init.name not in weights]:
            raise BenchError(f"the base heads graph has weights this plugin has not: {missing}")
        for init in plugin_inits:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(np.float32), init.name))
        onnx.save(graph, str(tmp / HEADS_GRAPH))
        features = torch.from_numpy(load_file(str(base / PARITY_REFERENCE))["features"])
        reference = heads_reference(model, features, tables)
        save_file(reference, str(tmp / PARITY_REFERENCE))
        derived = replace(manifest, classes=model.classes, model_id=model_id_of("fvgpt", manifest.backbone.name, tmp),
                          run={"generated": f"benchmarks.model_repository, derived from {manifest.model_id}"},
                          files=dict.fromkeys(manifest.files))
        derived.write(tmp)
        reports = check_bundle(tmp, np.zeros(0), reference, {})  # heads and text; the tower is the base's
        gate(reports)
        derived.parity = manifest.parity | {"checks": reports, "derived_from": manifest.model_id}
        derived.write(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def generate(out: Path, count: int, model_name: str, pretrained: str, init_seed: int = 0, seed: int = 0,
             n_classes: int = 10, progress: bool = True) -> list[Path]:
    """DIR/clf-0000/1 (a full export) ... DIR/clf-{count-1}/1 (derived); existing ones are kept (resume)."""
    from fvgpt.backbone import load_backbone
    from fvgpt.config import TrainConfig
    from fvgpt_export.build import ExportOptions, export_model
    from fvgpt_runtime.bundle import Bundle

    if not 1 <= count <= 100_000 or not 2 <= n_classes <= len(WORDS):
        raise BenchError(f"--count must be in 1..100000 and --classes in 2..{len(WORDS)}")
    backbone = load_backbone(model_name, pretrained, "cpu", init_seed)
    # generated, not trained: the config only sizes the plugin; its data source is the repository being written
    cfg = TrainConfig(data=str(out), model=model_name, pretrained=pretrained, init_seed=init_seed)
    base = classifier_dir(out, 0)
    t0 = time.perf_counter()
    if not (base / "manifest.json").is_file():
        export_model(generated_model(backbone, cfg, 0, seed, n_classes), base,
                     ExportOptions(progress=progress, force=True), pretrained, init_seed,
                     {"generated": "benchmarks.model_repository"})
    keep = Bundle(base)  # holds the shared text graph's session for every derived bundle's text check
    keep.open_text()
    paths = [base]
    for i in range(1, count):
        path = classifier_dir(out, i)
        if not (path / "manifest.json").is_file():
            derive(base, generated_model(backbone, cfg, i, seed, n_classes), path)
        paths.append(path)
        if progress and (i % 50 == 0 or i == count - 1):
            print(f"  {i + 1}/{count} classifiers ({time.perf_counter() - t0:.0f} s)", flush=True)
    return paths


# ---- run --------------------------------------------------------------------------------------------------------

def link_tree(src: Path, dst: Path) -> None:
    """A copy of `src` made of hard links (a bundle costs no disk and keeps its files' inodes)."""
    shutil.copytree(src, dst, copy_function=os.link)


def view(repository: Path, k: int, into: Path) -> list[str]:
    """A repository folder holding the first k classifiers of `repository`; their names."""
    names = sorted(p.name for p in repository.iterdir() if p.name.startswith(f"{PREFIX}-"))[:k]
    if len(names) < k:
        raise BenchError(f"{repository} holds {len(names)} classifiers, fewer than {k}: generate more first")
    into.mkdir(parents=True)
    for name in names:
        link_tree(repository / name, into / name)
    return names


class Server:
    """`fvgpt serve --repository DIR` on a free loopback port, stopped by process id."""

    def __init__(self, folder: Path, log: Path, poll_s: float, env: dict[str, str]):
        from fvgpt_serving.cli import server_command
        from fvgpt_serving.process import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("FVGPT_") or k == "FVGPT_API_KEY"}
        self.log = open(log, "w")  # noqa: SIM115 - closed by stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(server_command("127.0.0.1", self.port),
                                     env=inherited | env | {"FVGPT_REPOSITORY": str(folder),
                                                            "FVGPT_POLL_S": str(poll_s)},
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout_s: float) -> float:
        from fvgpt_serving.process import wait_ready

        wait_ready(self.proc, self.url, timeout_s)
        return time.perf_counter() - self.started

    def stop(self) -> None:
        from fvgpt_serving.process import stop

        stop(self.proc)
        self.log.close()


def models(url: str, headers: dict) -> dict[str, dict]:
    import httpx

    return {m["name"]: m for m in httpx.get(f"{url}/models", headers=headers, timeout=60).json()["models"]}


def pickup_seconds(server: Server, source: Path, folder: Path, name: str, headers: dict, timeout_s: float) -> float:
    """Rename a new classifier into the served folder; seconds until /models lists it ready."""
    staging = folder / f".{name}"
    link_tree(source, staging)
    t0 = time.perf_counter()
    os.replace(staging, folder / name)
    while time.perf_counter() - t0 < timeout_s:
        state = models(server.url, headers).get(name, {}).get("state")
        if state == "ready":
            return time.perf_counter() - t0
        if state == "failed":
            raise BenchError(f"the new classifier {name} was refused: see {server.log.name}")
        time.sleep(0.05)
    raise BenchError(f"the new classifier {name} was not served within {timeout_s:.0f} s")


def measure(repository: Path, k: int, args, work: Path) -> dict:
    photos = photo_bytes()
    folder = work / f"k{k}"
    names = view(repository, k, folder)
    extra = sorted(p for p in repository.iterdir() if p.name.startswith(f"{PREFIX}-"))[k:k + args.pickups]
    server = Server(folder, work / f"server-k{k}.log", args.poll, {"FVGPT_MAX_MODELS": str(max(k, 1024))})
    try:
        load_s = server.wait(args.ready_timeout)
        target = parse_target(server.url)
        headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
        rng = random.Random(k)
        one = [multipart(photos, i, 1, [("model", rng.choice(names))]) for i in range(64)]
        every = [multipart(photos, i, 1, [("models", "*")]) for i in range(len(photos))]
        for body in (one[0], every[0]):
            check_service(target, body, args.timeout)
        level = SimpleNamespace(requests=args.requests, duration=args.duration, timeout=args.timeout,
                                images_per_request=1)
        row = {"classifiers": k, "load_s": load_s}
        for mode, bodies in (("one", one), ("all", every)):
            for body in bodies[:args.concurrency]:  # warm-up: every heads session and label path used once
                check_service(target, body, args.timeout)
            r = run_level(target, bodies, args.concurrency, level)
            row |= {f"{mode}_images_per_s": r["images_per_s"], f"{mode}_p50_ms": r["latency_ms_p50"],
                    f"{mode}_p99_ms": r["latency_ms_p99"], f"{mode}_errors": r["errors"],
                    f"{mode}_requests": r["requests"]}
            print(f"K={k} {mode}: {r['images_per_s']:.2f} images/s, p50 {r['latency_ms_p50'] or 0:.0f} ms, "
                  f"{r['errors']} errors", file=sys.stderr)
        row["all_cost_vs_one"] = (row["one_images_per_s"] / row["all_images_per_s"]
                                  if row["all_images_per_s"] else None)
        from fvgpt_serving.process import rss_mib

        rss = rss_mib(server.proc.pid)
        row |= {"rss_api_mib": rss["api"], "rss_tower_mib": rss["tower"], "rss_total_mib": rss["total"]}
        pickups = [pickup_seconds(server, src, folder, f"new-{i}", headers, args.ready_timeout)
                   for i, src in enumerate(extra)]
        row |= {"pickup_s_max": max(pickups, default=None), "pickup_s_mean": sum(pickups) / len(pickups)
                if pickups else None, "pickups": len(pickups)}
        return row
    finally:
        server.stop()


def tables_mib(repository: Path, names: list[str]) -> float:
    from fvgpt_runtime.manifest import Manifest

    sizes = [(repository / n / "1" / Manifest.read(repository / n / "1").tables).stat().st_size for n in names]
    return sum(sizes) / len(sizes) / 2**20


def run(args) -> dict:
    repository = Path(args.repository)
    if not (classifier_dir(repository, 0) / "manifest.json").is_file():
        raise BenchError(f"{repository} is not a generated repository: run `python -m benchmarks.model_repository "
                         f"generate --out {repository}` first")
    load_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fvgpt-repo-bench-", dir=args.work) as work:
        for k in args.sizes:
            rows.append(measure(repository, k, args, Path(work)))
    base = rows[0]
    names = sorted(p.name for p in repository.iterdir() if p.name.startswith(f"{PREFIX}-"))
    for r in rows:
        added = r["classifiers"] - base["classifiers"]
        r["rss_per_added_classifier_mib"] = ((r["rss_total_mib"] - base["rss_total_mib"]) / added) if added else None
    tables = tables_mib(repository, names[:max(args.sizes)])
    from fvgpt_runtime.manifest import Manifest

    m = Manifest.read(classifier_dir(repository, 0))
    return {"benchmark": "model_repository", "created": utc_now(), "command": command_line(),
            "machine": machine_info(), "load_average": {"start": load_start, "end": load_average()},
            "versions": library_versions(),
            "repository": {"path": str(repository.resolve()), "backbone": m.backbone.name, "tower_id": m.tower_id,
                           "classes_per_classifier": len(m.classes.names), "tables_mib_per_classifier": tables},
            "settings": {"sizes": args.sizes, "concurrency": args.concurrency, "requests": args.requests,
                         "duration_s": args.duration, "poll_s": args.poll, "pickups": args.pickups,
                         "client": "threads + http.client, keep-alive, one image per request (multipart)"},
            "results": rows}


def markdown_table(report: dict) -> str:
    lines = ["| K | load s | one: images/s | all: images/s | all ÷ one cost | RSS API MiB | RSS tower MiB | "
             "MiB per added classifier | pick-up s (max) |", "|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt=".2f"):
        return "—" if v is None else format(v, fmt)

    for r in report["results"]:
        lines.append(f"| {r['classifiers']} | {f(r['load_s'], '.1f')} | {f(r['one_images_per_s'])} | "
                     f"{f(r['all_images_per_s'])} | {f(r['all_cost_vs_one'])} | {f(r['rss_api_mib'], '.0f')} | "
                     f"{f(r['rss_tower_mib'], '.0f')} | {f(r['rss_per_added_classifier_mib'], '.3f')} | "
                     f"{f(r['pickup_s_max'])} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.model_repository", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write a repository of generated classifiers on one tower")
    g.add_argument("--out", required=True, help="repository folder (created; existing classifiers are kept)")
    g.add_argument("--count", type=int, required=True, help="classifiers to generate")
    g.add_argument("--model", default="fvgpt-tiny", help="open_clip model (default fvgpt-tiny; e.g. ViT-B-16)")
    g.add_argument("--pretrained", default="none", help="weights (default none: random, deterministic)")
    g.add_argument("--init-seed", type=int, default=0, help="seed of random backbone weights (another seed: "
                                                            "another tower)")
    g.add_argument("--seed", type=int, default=0, help="seed of the classifiers' classes, contexts and plugins")
    g.add_argument("--classes", type=int, default=10, help="classes per classifier (default 10)")
    r = sub.add_parser("run", help="serve views of K classifiers and measure them")
    r.add_argument("--repository", required=True, help="a folder written by `generate`")
    r.add_argument("--sizes", type=int_list, default=[1, 10, 100, 1000], help="K values (default 1,10,100,1000)")
    r.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    r.add_argument("--requests", type=int, default=200, help="requests per mode and K at most (default 200)")
    r.add_argument("--duration", type=float, default=30.0, help="seconds per mode and K at most (default 30)")
    r.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    r.add_argument("--poll", type=float, default=1.0, help="the server's FVGPT_POLL_S (default 1)")
    r.add_argument("--pickups", type=int, default=3, help="new bundles renamed in per K to time the pick-up "
                                                          "(default 3; needs that many classifiers beyond K)")
    r.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds to wait for a server to load "
                                                                       "(default 1800)")
    r.add_argument("--work", help="folder for the views and server logs (default: the system's temp folder)")
    r.add_argument("--out", default="runs/benchmarks", help="folder for model_repository.json and .csv")
    return p


def main(argv: list[str] | None = None) -> int:
    from fvgpt.errors import FVGPTError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            paths = generate(Path(args.out), args.count, args.model, args.pretrained, args.init_seed, args.seed,
                             args.classes)
            print(f"{len(paths)} classifiers in {args.out}")
            return 0
        if min(args.sizes) < 1 or args.concurrency < 1 or args.pickups < 0:
            raise BenchError("--sizes and --concurrency must be positive, --pickups at least 0")
        report = run(args)
    except (BenchError, FVGPTError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path, csv_path = write_outputs(Path(args.out), "model_repository", report, report["results"])
    print(markdown_table(report))
    print(f"load average {report['load_average']}; wrote {json_path}, {csv_path}")
    print(json.dumps(report["repository"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
