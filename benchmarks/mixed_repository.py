"""One CoOp, one PromptSRC and one MMRL classifier on one backbone (random weights): what sharing tower graphs saves.

    python -m benchmarks.mixed_repository --out DIR [--model ViT-B-16] [--precision int8] [--batch 8] [--rounds 6]
                                          [--threads 2]

Generate (kept when there, so a rerun resumes): per method a generated classifier (the backbone's random weights, a
random learner and plugin), exported with the full export and its parity gate into DIR/bundles/<method>.

Measure, in one process on the bundle runtime, the way a repository runs them (fvgpt_runtime.shared_towers: each
distinct tower graph once per image for every classifier that needs it):
- images/s of each classifier alone and of the three together (towers + every classifier's heads over its classes,
  so the new head, Prior Calibration), at --batch, timed round robin so that load hits all alike;
- tower passes per served image: the graph runs weighted by their transformer blocks (the spec's count: PromptSRC
  N + 1, MMRL ≈ 1.58), and weighted by each graph's measured time against CLIP's whole tower;
- stage-2 training passes per image of each method, counted on the torch model's blocks in one plugin step.
Writes DIR/mixed_repository.json and .csv.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # `python benchmarks/mixed_repository.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import (command_line, library_versions, load_average, machine_info, run_reporting_errors,
                               utc_now, write_outputs)

METHODS = ("coop", "promptsrc", "mmrl")
CLASSES = ["red cat", "green dog", "blue car", "yellow truck", "purple bird", "orange boat", "black chair",
           "white table", "grey cup", "brown phone"]


def generated_model(backbone, method: str, seed: int):
    """A classifier of `method` on the backbone: its learner and a plugin at their initialisation moved by noise, so no
    weight sits at a trivial value."""
    import torch

    from fvgpt.classes import ClassSplit
    from fvgpt.config import TrainConfig
    from fvgpt.model import FVGPTModel

    torch.manual_seed(seed)
    cfg = TrainConfig(data="generated", model=backbone.name, pretrained="none", method=method)
    model = FVGPTModel.new_prompt(backbone, ClassSplit.paper(CLASSES), cfg)
    model.new_plugin(model.tuned_scale)
    with torch.no_grad():
        for p in [*model.prompt.parameters(), *model.plugin.parameters()]:
            p.add_(torch.randn_like(p) * 0.01)
    return model.requires_grad_(False).eval()


def blocks_per_role(model) -> dict[str, int]:
    """The transformer blocks each tower role's graph runs (fvgpt_export.build.tower_roles)."""
    from fvgpt.mmrl import trunk_blocks

    total = len(model.tower.visual.transformer.resblocks)
    if model.cfg.method == "mmrl":
        start = trunk_blocks(model.tower.visual, len(model.prompt.to_visual))
        return {"trunk": start, "image": total - start, "mmrl": total - start}
    return {"image": total} | ({"promptsrc": total} if model.cfg.method == "promptsrc" else {})


def training_passes(model) -> float:
    """Tower passes per image of one stage-2 step (FVGPTModel.plugin_loss), counted on the visual blocks."""
    import torch

    blocks = list(model.tower.visual.transformer.resblocks)
    seen = [0]
    hooks = [b.register_forward_hook(lambda _m, args, _o: seen.__setitem__(0, seen[0] + args[0].shape[0]))
             for b in blocks]
    size = model.backbone.preprocess.size
    pixels, masks = torch.randn(2, 3, size, size), torch.ones(2, 1, size, size)
    masks[:, :, : size // 2] = 0
    try:
        with torch.no_grad():
            model.plugin_loss(pixels, masks, torch.ones(2), torch.tensor([0, 1]),
                              model.tables(list(model.classes.base_names)))
    finally:
        for h in hooks:
            h.remove()
    return seen[0] / (len(blocks) * 2)


def generate(out: Path, model_name: str, precision: str, progress: bool) -> dict:
    """DIR/bundles/<method> and DIR/bundles/facts.json (blocks per role, training passes); kept when there."""
    facts_path = out / "bundles" / "facts.json"
    if facts_path.is_file() and all((out / "bundles" / m / "manifest.json").is_file() for m in METHODS):
        return json.loads(facts_path.read_text())
    from fvgpt.backbone import load_backbone  # torch: only to generate
    from fvgpt_export.build import ExportOptions, export_model
    backbone = load_backbone(model_name, "none", "cpu", 0)
    facts = {}
    for i, method in enumerate(METHODS):
        model = generated_model(backbone, method, i)
        path = out / "bundles" / method
        if not (path / "manifest.json").is_file():
            t0 = time.perf_counter()
            export_model(model, path, ExportOptions(precision=precision, parity_images=12, progress=progress,
                                                    force=True), "none", 0, {"generated": f"mixed {method}"})
            print(f"{method}: exported in {time.perf_counter() - t0:.0f} s", flush=True)
        facts[method] = {"blocks": blocks_per_role(model), "training_passes": round(training_passes(model), 4)}
    facts_path.write_text(json.dumps(facts, indent=2))
    return facts


def _figure(x: float) -> float:
    """Six significant digits: a fixed number of decimals would round a tiny model's sub-millisecond times to a few
    digits, and images/s would no longer be the inverse of the time per image it is reported beside."""
    return float(f"{x:.6g}")


def run(args) -> dict:
    from PIL import Image

    from fvgpt.photos import photo_paths
    from fvgpt_runtime.bundle import Bundle
    from fvgpt_runtime.host import round_robin
    from fvgpt_runtime.preprocess import preprocess
    from fvgpt_runtime.shared_towers import SharedTowers

    out = Path(args.out)
    facts = generate(out, args.model, args.precision, not args.quiet)
    bundles = {m: Bundle(out / "bundles" / m, threads=args.threads) for m in METHODS}
    pre = bundles["coop"].preprocess
    photos = [preprocess(Image.open(p), pre) for p in photo_paths()]
    pixels = np.stack([photos[i % len(photos)] for i in range(args.batch)])
    configs = {m: [m] for m in METHODS} | {"mix": list(METHODS)}
    plans = {name: (SharedTowers([bundles[m] for m in ms], args.precision, threads=args.threads), ms)
             for name, ms in configs.items()}

    def serve(name: str):
        shared, methods = plans[name]

        def call(x: np.ndarray) -> None:
            for m, features in zip(methods, shared(x)):
                bundles[m].scores(features)
        return call

    mix = plans["mix"][0]
    graph_blocks = {}
    for m, keys in zip(METHODS, mix.keys):
        for role, key in keys.items():
            graph_blocks[key] = {"blocks": facts[m]["blocks"][role], "role": role, "first_used_by": m}
    inputs: dict[str, np.ndarray] = {}  # every graph's input at this batch, to time the graphs alone
    outputs: dict[str, np.ndarray] = {}
    for key, (runner, source) in mix.nodes.items():
        inputs[key] = pixels if source is None else outputs[source]
        outputs[key] = runner(inputs[key])
    load_start = load_average()
    times = round_robin({("config", n): serve(n) for n in configs} |
                        {("graph", k): (lambda x, k=k: mix.nodes[k][0](inputs[k])) for k in mix.nodes},
                        pixels, args.warmup, args.rounds)
    load_end = load_average()
    per_image = {key: float(np.median(t)) / args.batch for key, t in times.items()}
    tower_blocks = facts["coop"]["blocks"]["image"]
    clip_key = mix.keys[0]["image"]
    rows = []
    for name, methods in configs.items():
        shared = plans[name][0]
        keys = list(shared.nodes)
        by_blocks = sum(graph_blocks[k]["blocks"] for k in keys) / tower_blocks
        by_time = sum(per_image[("graph", k)] for k in keys) / per_image[("graph", clip_key)]
        rows.append({"config": name, "classifiers": "+".join(methods), "graph_runs_per_image": shared.graph_runs,
                     "passes_by_blocks": round(by_blocks, 4), "passes_by_graph_time": round(by_time, 4),
                     "ms_per_image": _figure(1000 * per_image[("config", name)]),
                     "images_per_s": _figure(1 / per_image[("config", name)])})
    alone = sum(r["ms_per_image"] for r in rows if r["config"] != "mix")
    mixed = next(r for r in rows if r["config"] == "mix")
    return {
        "rows": rows,
        "mix_vs_sum": {"mix_ms_per_image": mixed["ms_per_image"], "sum_alone_ms_per_image": _figure(alone),
                       "ratio": round(mixed["ms_per_image"] / alone, 4),
                       "passes_mix": mixed["passes_by_blocks"],
                       "passes_sum": round(sum(r["passes_by_blocks"] for r in rows if r["config"] != "mix"), 4)},
        "graphs": {k: graph_blocks[k] | {"ms_per_image": _figure(1000 * per_image[("graph", k)]),
                                         "passes_by_time": round(per_image[("graph", k)] / per_image[("graph",
                                                                                                      clip_key)], 4)}
                   for k in mix.nodes},
        "training_passes": {m: facts[m]["training_passes"] for m in METHODS},
        "spec": {"serve_new_head": {"coop": 1, "promptsrc": 2, "mmrl": round(1 + 7 / 12, 4)},
                 "training": {"coop": 2, "promptsrc": 3, "mmrl": round(2 + 7 / 12, 4)}},
        "settings": {"model": args.model, "pretrained": "none (random weights)", "precision": args.precision,
                     "batch": args.batch, "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
                     "timing": "median seconds per call over the rounds, round robin over configurations and graphs"},
        "command": command_line(), "started_utc": utc_now(), "load_average": {"start": load_start, "end": load_end},
        "machine": machine_info(), "versions": library_versions(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mixed_repository", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the bundles and the results")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights) (default: ViT-B-16)")
    p.add_argument("--precision", default="int8", choices=["fp32", "int8"], help="tower precision (default: int8)")
    p.add_argument("--batch", type=int, default=8, help="images per call (default: 8)")
    p.add_argument("--rounds", type=int, default=6, help="timed calls per configuration and graph (default: 6)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: 1)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads per graph (default: 2)")
    p.add_argument("--quiet", action="store_true", help="no export progress")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        raise SystemExit("error: --batch and --rounds must be at least 1")
    report = run_reporting_errors(run, args)
    if report is None:
        return 2
    out = Path(args.out)
    json_path, csv_path = write_outputs(out, "mixed_repository", report, report["rows"])
    print("| configuration | graph runs / image | passes (blocks) | passes (graph time) | ms / image | images/s |")
    print("|---|---|---|---|---|---|")
    for r in report["rows"]:
        print(f"| {r['classifiers']} | {r['graph_runs_per_image']} | {r['passes_by_blocks']:.2f} | "
              f"{r['passes_by_graph_time']:.2f} | {r['ms_per_image']:.1f} | {r['images_per_s']:.2f} |")
    m = report["mix_vs_sum"]
    print(f"mix {m['mix_ms_per_image']:.1f} ms/image vs the three alone {m['sum_alone_ms_per_image']:.1f} "
          f"(x{m['ratio']:.2f}); training passes per image {report['training_passes']}; load average "
          f"{report['load_average']}; wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
