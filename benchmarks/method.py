"""Does FVG-PT fix what it is for? Zero-shot CLIP, CoOp, KgCoOp, FVG-PT on each, and ablations of FVG-PT on CoOp, in
the generated world (fvgpt.world) with the committed micro-CLIP, over several seeds.

    python -m benchmarks.method [--world-seed S] [--classes N] [--correlation R] [--shots K] [--seeds 1,2,3]
                                [--sensitivity 0,0.5,0.9] [--quick] --out DIR

For each correlation rate (the main one and the --sensitivity ones) and each seed, a task is drawn (the seed picks
the K-shot training images; the test set is the same for every seed and rate, its scenes balanced per class), stage 1
is trained once per prompt learner (CoOp, KgCoOp) and stage 2 once per variant on a copy of that run dir. Every row is
evaluated by fvgpt.evaluate (Base: base head on base classes; New: new head on new classes; HM; D_fg at τ = 1 on the
base test images), and the FRG/BRG gate statistics are collected. Writes DIR/method.json (`methods`: mean and std
over seeds at the main rate; `sensitivity`, `gates`, `per_seed`, settings, machine), method.csv (one row per rate ×
method × seed), method.md (the tables) and method.png (bars with error bars, HM against the correlation rate).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

if not __package__:  # `python benchmarks/method.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import (BenchError, command_line, library_versions, load_average, machine_info, utc_now,
                               write_outputs)

METRICS = ("base", "new", "hm", "d_fg")
# method → (stage-1 prompt learner, stage-2 settings or None for the stage-1 model itself, row of fvgpt.evaluate)
METHODS: dict[str, tuple[str, dict | None, str]] = {
    "zero_shot": ("coop", {}, "zero-shot"),
    "coop": ("coop", {}, "coop"),
    "kgcoop": ("kgcoop", {}, "kgcoop"),
    "fvgpt_coop": ("coop", {}, "fvgpt"),
    "fvgpt_kgcoop": ("kgcoop", {}, "fvgpt"),
    "fvgpt_coop_no_frg": ("coop", {"frg": False}, "fvgpt"),
    "fvgpt_coop_no_dist": ("coop", {"lambda_d": 0.0}, "fvgpt"),
    "fvgpt_coop_no_pc": ("coop", {"prior_calibration": False}, "fvgpt"),
}
# the plugin runs: name → (stage-1 learner, settings); zero-shot and the stage-1 rows come from the full runs
VARIANTS = {name: (learner, settings) for name, (learner, settings, row) in METHODS.items() if row == "fvgpt"}
# TrainConfig fields that are per task or seed, or say nothing about the method
UNRECORDED = ("data", "dataset", "root", "seed", "shots", "base_classes", "pretrained", "split_file", "image_dir",
              "test_fraction", "workers", "init_seed", "device", "method", "ctx_init", "prompt_augment")
QUICK = {"classes": 4, "shots": 2, "test_images": 8, "epochs": 1, "seeds": [1, 2], "sensitivity": [0.0]}


def float_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"correlation rates must be in [0, 1], got {text!r}")
    return list(dict.fromkeys(values))


def seed_list(text: str) -> list[int]:
    try:
        values = list(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(values) < 2:
        raise argparse.ArgumentTypeError("need at least two seeds for a standard deviation")
    return values


def build_parser() -> argparse.ArgumentParser:
    from fvgpt.world import TaskSpec, add_options

    p = argparse.ArgumentParser(prog="python -m benchmarks.method", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the world's tasks")
    add_options(g, TaskSpec, skip=("draw",))
    g = p.add_argument_group("the benchmark")
    g.add_argument("--seeds", type=seed_list, default=[1, 2, 3],
                   help="seeds: each draws its own K-shot images and seeds training (default: 1,2,3)")
    g.add_argument("--sensitivity", type=float_list, default=[0.0, 0.5],
                   help="further correlation rates to run every method at (default: 0,0.5; empty: none)")
    g.add_argument("--pretrained", help="micro-CLIP checkpoint (default: the committed one, sha256 checked)")
    g.add_argument("--epochs", type=int, help="epochs of both stages (default: the world's training settings)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default: 1: the micro-CLIP's batch-4 steps are too small to share "
                        "between threads, and on a loaded machine a second thread mostly waits)")
    g.add_argument("--quick", action="store_true",
                   help=f"a smoke run for tests: {QUICK['classes']} classes, {QUICK['shots']} shots, "
                        f"{QUICK['test_images']} test images per split, {QUICK['epochs']} epoch, seeds 1,2, one "
                        "extra rate (0)")
    g.add_argument("--out", required=True, help="results folder (tasks/ and runs/ go under it too)")
    return p


def checkpoint(path: str | None) -> Path:
    from fvgpt.world_clip import verified_checkpoint

    if path and not Path(path).is_file():
        raise BenchError(f"--pretrained {path}: no such file")
    return Path(path) if path else verified_checkpoint()


def run_cell(cfg, runs: Path, progress: bool) -> dict[str, dict]:
    """Every method on one task and seed: {method: evaluate() row, plus "gates" for the plugin rows and
    "train_s"}."""
    from fvgpt.data import index_for
    from fvgpt.evaluate import evaluate
    from fvgpt.rundir import load_run, read_config, write_config
    from fvgpt.train import train

    index = index_for(cfg, draw=False)  # evaluation reads only the test list
    results: dict[str, dict] = {}
    for learner in ("coop", "kgcoop"):
        stage1 = runs / learner
        t0 = time.perf_counter()
        train(replace(cfg, method=learner, ctx_init=None, prompt_augment=None), stage1, stage="prompt",
              progress=False)
        stage1_s = time.perf_counter() - t0
        for name, (of, settings) in VARIANTS.items():
            if of != learner:
                continue
            run = runs / name
            shutil.copytree(stage1, run)
            stored, record = read_config(run)
            variant = replace(stored, **settings)
            write_config(run, variant, record)  # the run dir says which variant it is
            t0 = time.perf_counter()
            train(variant, run, stage="plugin", resume=True, progress=False)
            plugin_s = time.perf_counter() - t0
            metrics = evaluate(load_run(run).model, index, cfg.eval_batch, progress=False)
            (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
            results[name] = metrics["models"]["fvgpt"] | {"gates": metrics["gates"], "train_s": plugin_s}
            if not settings:  # the full variant's evaluation carries the stage-1 and zero-shot rows too
                results[learner] = metrics["models"][learner] | {"train_s": stage1_s}
                results.setdefault("zero_shot", metrics["models"]["zero-shot"] | {"train_s": 0.0})
        if progress:
            print(f"  {learner} and its FVG-PT variants done", flush=True)
    return results


def _value(row: dict, metric: str) -> float:
    return row["d_fg"]["tau1"] if metric == "d_fg" else row[metric]


def summarise(cells: dict[int, dict[str, dict]]) -> dict:
    """{method: {metric: {"mean", "std"}}} over seeds (std: sample standard deviation, ddof = 1)."""
    out = {}
    for method in METHODS:
        out[method] = {}
        for metric in METRICS:
            values = np.array([_value(cell[method], metric) for cell in cells.values()])
            out[method][metric] = {"mean": round(float(values.mean()), 4),
                                   "std": round(float(values.std(ddof=1)), 4) if len(values) > 1 else 0.0}
    return out


def _pool(stats: list[dict | None], key: str = "mean") -> float | None:
    """The mean over seeds of a per-seed statistic, weighted by its image count (None where no seed has one)."""
    kept = [s for s in stats if s]
    n = sum(s["n"] for s in kept)
    return round(sum(s[key] * s["n"] for s in kept) / n, 4) if n else None


def gate_summary(cells: dict[int, dict[str, dict]]) -> dict:
    """Per FVG-PT variant, pooled over seeds: r against r*, and b on base and new test images."""
    out = {}
    for method in VARIANTS:
        frg = [cell[method]["gates"]["frg"] for cell in cells.values()]
        brg = [cell[method]["gates"]["brg"] for cell in cells.values()]
        out[method] = {
            "r_mean": _pool([g["r"] for g in frg]), "r_std": _pool([g["r"] for g in frg], "std"),
            "r_star_rate": round(float(np.mean([g["r_star_rate"] for g in frg])), 4),
            "r_when_r_star_1": _pool([g["r_when_r_star_1"] for g in frg]),
            "r_when_r_star_0": _pool([g["r_when_r_star_0"] for g in frg]),
            "agreement": round(float(np.mean([g["agreement"] for g in frg])), 4),
            **{f"b_{split}": _pool([g[split]["b"] for g in brg]) for split in ("base", "new")},
            **{f"b_{split}_std": _pool([g[split]["b"] for g in brg], "std") for split in ("base", "new")},
            "b_new_when_only_clip_right": _pool([g["new"]["b_when_only_clip_right"] for g in brg]),
            "b_new_when_only_full_right": _pool([g["new"]["b_when_only_full_right"] for g in brg]),
        }
    return out


def markdown(summary: dict, rate: float) -> str:
    lines = [f"correlation {rate:g}: mean ± std over seeds", "",
             "| method | Base | New | HM | D_fg (τ = 1) |", "|---|---|---|---|---|"]
    for method, row in summary.items():
        cells = [f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}" if m != "d_fg"
                 else f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gates_markdown(gates: dict) -> str:
    lines = ["| variant (means) | r | r where r* = 1 | r where r* = 0 | r* rate | agreement (r > ½ ⇔ r*) | b base "
             "| b new | b new, only CLIP right | b new, only z_full right |", "|" + "---|" * 10]

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    for method, g in gates.items():
        lines.append(f"| {method} | {fmt(g['r_mean'])} | {fmt(g['r_when_r_star_1'])} | {fmt(g['r_when_r_star_0'])} "
                     f"| {fmt(g['r_star_rate'])} | {fmt(g['agreement'])} | {fmt(g['b_base'])} | {fmt(g['b_new'])} "
                     f"| {fmt(g['b_new_when_only_clip_right'])} | {fmt(g['b_new_when_only_full_right'])} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> str | None:
    """Left: mean ± std of Base, New and HM per method at the main rate; right: HM against the correlation rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]')"
    methods = list(report["methods"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.27
    x = np.arange(len(methods))
    for k, metric in enumerate(("base", "new", "hm")):
        means = [report["methods"][m][metric]["mean"] for m in methods]
        stds = [report["methods"][m][metric]["std"] for m in methods]
        left.bar(x + (k - 1) * width, means, width, yerr=stds, capsize=3, label=metric.upper() if metric == "hm"
                 else metric.capitalize())
    left.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
    left.set_ylabel("accuracy (%)")
    low = min(report["methods"][m][k]["mean"] for m in methods for k in ("base", "new", "hm"))
    left.set_ylim(max(0, low - 15), 100)
    left.set_title(f"correlation {report['settings']['correlation']:g}, mean ± std over "
                   f"{len(report['settings']['seeds'])} seeds")
    left.legend(fontsize=8)
    left.grid(True, axis="y", alpha=0.3)
    rates = sorted(float(r) for r in report["sensitivity"])
    for method in ("zero_shot", "coop", "kgcoop", "fvgpt_coop", "fvgpt_kgcoop"):
        rows = [report["sensitivity"][f"{r:g}"][method]["hm"] for r in rates]
        right.errorbar(rates, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], marker="o", capsize=3,
                       label=method)
    right.set_xlabel("training-image scene correlation with the class")
    right.set_ylabel("HM (%)")
    right.set_title("HM against the correlation rate")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"generated world {s['world_seed']}: {s['classes']} classes, {s['shots']} shots, "
                 f"{s['test_images']} test images per split, {s['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run(args) -> dict:
    import torch

    from fvgpt.config import TrainConfig
    from fvgpt.world import TaskSpec, base_classes, from_args, make_task
    from fvgpt.world import WORLD_MODEL, world_train_settings

    torch.set_num_threads(args.threads)
    ckpt = checkpoint(args.pretrained)
    out = Path(args.out)
    overrides = {}
    if args.quick:
        overrides = {k: QUICK[k] for k in ("classes", "shots", "test_images")}
        args.seeds, args.sensitivity, args.epochs = QUICK["seeds"], QUICK["sensitivity"], QUICK["epochs"]
    main_spec = from_args(TaskSpec, args, **overrides)
    rates = [main_spec.correlation] + [r for r in args.sensitivity if r != main_spec.correlation]
    if (out / "runs").exists():
        raise BenchError(f"{out / 'runs'} exists from an earlier run; choose another --out or remove it")
    load_start, t_start = load_average(), time.perf_counter()
    per_rate: dict[str, dict[int, dict[str, dict]]] = {}
    for rate in rates:
        per_rate[f"{rate:g}"] = cells = {}
        for seed in args.seeds:
            spec = replace(main_spec, correlation=rate, draw=seed)
            task = make_task(out / "tasks" / f"corr{rate:g}-seed{seed}", spec)
            epochs = {"prompt_epochs": args.epochs, "plugin_epochs": args.epochs} if args.epochs else {}
            cfg = TrainConfig(**(world_train_settings() | epochs), data=str(task), pretrained=str(ckpt),
                              shots=spec.shots, seed=seed, base_classes=base_classes(task))
            print(f"correlation {rate:g}, seed {seed}", flush=True)
            cells[seed] = run_cell(cfg, out / "runs" / f"corr{rate:g}-seed{seed}", progress=not args.quick)
    seconds = time.perf_counter() - t_start
    main_key = f"{main_spec.correlation:g}"
    rows = [{"correlation": float(rate), "method": m, "seed": seed,
             **{metric: round(_value(cell[m], metric), 4) for metric in METRICS},
             "train_s": round(cell[m]["train_s"], 2)}
            for rate, cells in per_rate.items() for seed, cell in cells.items() for m in METHODS]
    return {
        "methods": summarise(per_rate[main_key]),
        "sensitivity": {rate: summarise(cells) for rate, cells in per_rate.items()},
        "gates": {rate: gate_summary(cells) for rate, cells in per_rate.items()},
        "per_seed": rows,
        "settings": {**{k: v for k, v in vars(main_spec).items() if k != "draw"}, "seeds": args.seeds,
                     "rates": rates, "model": WORLD_MODEL, "pretrained": str(ckpt), "quick": args.quick,
                     "train": {k: v for k, v in TrainConfig(**world_train_settings(), data="task").to_dict().items()
                               if k not in UNRECORDED}
                     | ({"prompt_epochs": args.epochs, "plugin_epochs": args.epochs} if args.epochs else {}),
                     "threads": args.threads, "std": "sample standard deviation over seeds (ddof = 1)",
                     "d_fg": "KL(p_full ‖ p_fg) at τ = 1 of each row's base head, mean over base test images"},
        "command": command_line(), "started_utc": utc_now(), "seconds": round(seconds, 1),
        "load_average": {"start": load_start, "end": load_average()}, "machine": machine_info(),
        "versions": library_versions(),
    }


def main(argv: list[str] | None = None) -> int:
    from fvgpt.errors import FVGPTError

    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (BenchError, FVGPTError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    png = out / "method.png"
    reason = plot(report, png)
    if reason:
        print(f"plot skipped: {reason}", file=sys.stderr)
    report["plot"], report["plot_skipped"] = (None, reason) if reason else (png.name, None)
    tables = [markdown(report["sensitivity"][rate], float(rate)) + "\n\ngates (pooled over seeds):\n\n"
              + gates_markdown(report["gates"][rate]) for rate in report["sensitivity"]]
    (out / "method.md").write_text("\n\n".join(tables) + "\n")
    json_path, csv_path = write_outputs(out, "method", report, report["per_seed"])
    print("\n\n".join(tables))
    print(f"\n{report['seconds']:.0f} s, load average {report['load_average']}; wrote {json_path}, {csv_path}, "
          f"{out / 'method.md'}" + ("" if reason else f", {png}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
