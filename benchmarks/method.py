"""Does FVG-PT fix what it is for? Zero-shot CLIP, CoOp, KgCoOp, PromptSRC, MMRL, FVG-PT on each, and the paper's
ablations of FVG-PT (its Table 3) on CoOp and KgCoOp, in the generated world (fvgpt.world) with the committed
micro-CLIP, over several seeds.

    python -m benchmarks.method [--world-seed S] [--classes N] [--split random|colour|pattern] [--distractors D]
                                [--correlation R] [--shots K] [--seeds 1,2,3,4,5] [--sensitivity 0,0.5]
                                [--steps 1500] [--methods zero_shot,coop,...] [--quick] --out DIR

For each correlation rate (the main one and the --sensitivity ones) and each seed, a task is drawn (the seed picks
the K-shot training images; the test set is the same for every seed and rate, its scenes balanced per class), stage 1
is trained once per stage-1 learner (CoOp, KgCoOp, PromptSRC, MMRL, each with its own config's defaults and the same
epochs) and stage 2 once per distinct FVG-PT training on a copy of that run dir. Every row is evaluated by
fvgpt.evaluate on one pass of the frozen towers over the test images (one for CLIP's tower, shared by CoOp and KgCoOp;
one per PromptSRC or MMRL run; Base: base head on base classes; New: new head on new classes; HM; D_fg at τ = 1 on the
base test images), and the FRG/BRG gate statistics are collected. The ablation rows run at the main rate only.

The world checks (a)–(c) read zero-shot and CoOp only, so a world can be chosen without looking at FVG-PT:
`--methods zero_shot,coop` trains nothing else. (a) CoOp New ≤ zero-shot New − 3; (b) zero-shot Base on the foreground
view ≥ zero-shot Base on the full image + 3; (c) CoOp Base ≥ zero-shot Base + 3 (means over seeds, in points).

Interrupted? Run the same command again: run dirs already under DIR/runs are reused when finished (evaluated, not
trained again) and resumed when not; one made with other settings is refused.

Writes DIR/method.json (`methods`: mean, std over seeds and binomial SE at the main rate; `world_checks`,
`sensitivity`, `gates`, `per_seed`, settings with the steps per stage, `reused_runs`, machine), method.csv (one row
per rate × method × seed), method.md (the tables) and method.png (bars with error bars, HM against the correlation
rate).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

if not __package__:  # `python benchmarks/method.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import (BenchError, command_line, library_versions, load_average, machine_info, utc_now,
                               write_outputs)

METRICS = ("base", "new", "hm", "d_fg")


@dataclass(frozen=True)
class Method:
    """A row of the table: the stage-1 prompt learner it builds on and the fvgpt.evaluate row it is read from; for
    an FVG-PT row, the stage-2 config switches and the paper's Table 3 row it stands for.

    `shares`: the FVG-PT row whose trained plugin this row's switches would train again bit for bit. Switching a
    branch off (Prior Calibration, or FDC with its FRG) only drops that branch's loss terms, and the branches share
    no parameter, so the other branch trains exactly as with it (tests/test_method_wiring.py,
    test_switching_a_branch_off_leaves_the_other_as_trained); such a row is evaluated on a copy of the shared run
    dir with its own switches written in, instead of being trained again."""

    learner: str
    row: str
    switches: dict | None = None  # None: no plugin (zero-shot or the stage-1 model)
    shares: str | None = None
    every_rate: bool = True  # also run at the --sensitivity rates
    paper: str = ""


def fvgpt_rows(learner: str) -> dict[str, Method]:
    """FVG-PT on `learner` and its Table 3 ablations (docs/method.md, "Ablations")."""
    full = f"fvgpt_{learner}"
    return {full: Method(learner, "fvgpt", {}, paper="FRG + FDC + PC (full)"),
            f"{full}_no_frg": Method(learner, "fvgpt", {"frg": False}, every_rate=False, paper="FDC + PC"),
            f"{full}_pc_only": Method(learner, "fvgpt", {"fdc": False}, full, False, "PC only"),
            f"{full}_no_pc": Method(learner, "fvgpt", {"prior_calibration": False}, full, False, "FRG + FDC"),
            f"{full}_fdc_only": Method(learner, "fvgpt", {"frg": False, "prior_calibration": False}, f"{full}_no_frg",
                                       False, "FDC only")}


# one entry per row: a new prompt learner is a Method for its stage-1 row plus fvgpt_rows(learner) (or only the full
# FVG-PT row: the Table 3 ablations are the paper's on CoOp)
METHODS: dict[str, Method] = {"zero_shot": Method("coop", "zero-shot"), "coop": Method("coop", "coop"),
                              "kgcoop": Method("kgcoop", "kgcoop"), **fvgpt_rows("coop"), **fvgpt_rows("kgcoop"),
                              "promptsrc": Method("promptsrc", "promptsrc"),
                              "fvgpt_promptsrc": fvgpt_rows("promptsrc")["fvgpt_promptsrc"],
                              "mmrl": Method("mmrl", "mmrl"), "fvgpt_mmrl": fvgpt_rows("mmrl")["fvgpt_mmrl"]}
# TrainConfig fields that are per task or seed, or say nothing about the method
UNRECORDED = ("data", "dataset", "root", "seed", "shots", "base_classes", "pretrained", "split_file", "image_dir",
              "test_fraction", "workers", "init_seed", "device", "method", "ctx_init", "prompt_augment",
              "prompt_lr", "prompt_batch", "plugin_lr", "plugin_batch", "optimizer", "mmrl_template")
LEARNERS = ("coop", "kgcoop", "promptsrc", "mmrl")
QUICK = {"classes": 4, "shots": 2, "test_images": 8, "steps": 1, "seeds": [1, 2], "sensitivity": [0.0]}
CHECKS = {"a": ("CoOp New − zero-shot New", -3.0, "≤"),
          "b": ("zero-shot Base on the foreground view − zero-shot Base", 3.0, "≥"),
          "c": ("CoOp Base − zero-shot Base", 3.0, "≥")}


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


def method_list(text: str) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                                         f"{', '.join(METHODS)}")
    return [n for n in METHODS if n in names]  # the table's order


def world_parser(prog: str, doc: str, title: str) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """A parser described by `doc` (after its first paragraph) with every world task option (fvgpt.world.TaskSpec's
    fields but the draw, which the seeds set), and an empty argument group `title` for the script's own."""
    from fvgpt.world import TaskSpec, add_options

    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p.add_argument_group("the world's tasks"), TaskSpec, skip=("draw",))
    return p, p.add_argument_group(title)


def build_parser() -> argparse.ArgumentParser:
    from fvgpt.world import STAGE_STEPS

    p, g = world_parser("python -m benchmarks.method", __doc__, "the benchmark")
    g.add_argument("--seeds", type=seed_list, default=[1, 2, 3, 4, 5],
                   help="seeds: each draws its own K-shot images and seeds training (default: 1,2,3,4,5)")
    g.add_argument("--sensitivity", type=float_list, default=[0.0, 0.5],
                   help="further correlation rates to run the main methods at (default: 0,0.5; empty: none)")
    g.add_argument("--methods", type=method_list, default=list(METHODS),
                   help=f"rows to run (default: all: {', '.join(METHODS)}); zero_shot,coop are the world checks' "
                        "rows and train no FVG-PT")
    g.add_argument("--pretrained", help="micro-CLIP checkpoint (default: the committed one, sha256 checked)")
    g.add_argument("--steps", type=int, default=STAGE_STEPS,
                   help=f"optimiser steps per stage, at least: whole epochs of the base training images in batches "
                        f"of 4 (default: {STAGE_STEPS})")
    g.add_argument("--epochs", type=int, help="epochs of both stages instead of --steps")
    g.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default: 1: the micro-CLIP's batch-4 steps are too small to share "
                        "between threads, and on a loaded machine a second thread mostly waits)")
    g.add_argument("--quick", action="store_true",
                   help=f"a smoke run for tests: {QUICK['classes']} classes, {QUICK['shots']} shots, "
                        f"{QUICK['test_images']} test images per split, one epoch, seeds 1,2, one extra rate (0)")
    g.add_argument("--out", required=True, help="results folder (tasks/ and runs/ go under it too; finished runs there are reused)")
    return p


def checkpoint(path: str | None) -> Path:
    from fvgpt.world_clip import verified_checkpoint

    if path and not Path(path).is_file():
        raise BenchError(f"--pretrained {path}: no such file")
    return Path(path) if path else verified_checkpoint()


def _trained(names: list[str]) -> list[str]:
    """The FVG-PT rows to train for `names`: their own, or the ones they share."""
    return list(dict.fromkeys(METHODS[n].shares or n for n in names if METHODS[n].switches is not None))


def learner_config(cfg, learner: str):
    """The task's config for a stage-1 learner: its own defaults (fvgpt.config.METHOD_DEFAULTS: learning rates,
    batch, optimiser, ...) taken afresh, the world's crop scale kept, the same epochs for every learner (the paper
    runs each backbone's config for 10 epochs); PromptSRC's GPA with the shape FVG-PT's config gives it at 10 epochs
    (mean 15, std 1: in effect the last epoch) stretched to the run's epochs."""
    c = cfg.with_method(learner, keep=("crop_scale",))
    if learner == "promptsrc":
        c = replace(c, gpa_mean=1.5 * c.prompt_epochs, gpa_std=0.1 * c.prompt_epochs)
    return c


def _recorded(cfg) -> dict:
    """What a run is: its config but where it runs."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("device", "workers")}


def _reopen(run: Path, want) -> bool:
    """Whether `run` holds a run of config `want` to reuse (finished) or resume (interrupted); False when there is none.
    A folder without a config (training interrupted while it was set up) is removed; a run of other settings is
    refused rather than mixed into the table."""
    from fvgpt.rundir import read_config

    if not (run / "config.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        return False
    if _recorded(read_config(run)[0]) != _recorded(want):
        raise BenchError(f"{run} holds a run of other settings; rerun with the options it was made with, choose "
                         f"another --out or remove it")
    return True


def _copy_run(source: Path, run: Path, cfg, record) -> None:
    """`run` as a copy of `source` whose config is `cfg`; built under another name and renamed, so an interrupted
    copy is never taken for a run."""
    from fvgpt.rundir import write_config

    partial = run.with_name(run.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    write_config(partial, cfg, record)  # the run dir says which row it is
    partial.rename(run)


def _stage_seconds(run: Path, stage: str) -> float:
    """Seconds of the stage's epochs (train_log.jsonl), the same whether the run was trained now or reused."""
    lines = (run / "train_log.jsonl").read_text().splitlines()
    return sum(r["seconds"] for r in map(json.loads, lines) if r["stage"] == stage)


def finished_runs(runs: Path) -> int:
    """Run dirs under runs/<cell>/ whose every started stage has finished (stage 1 alone, or both)."""
    from fvgpt.rundir import read_json

    return sum(1 for p in runs.glob("*/*/progress.json") if not p.parent.name.endswith(".partial")
               and (d := read_json(p)) and all(s["done"] for s in d.values()))


def run_cell(cfg, runs: Path, names: list[str], progress: bool) -> dict[str, dict]:
    """The rows `names` on one task and seed: {method: evaluate() row, plus "gates" for the FVG-PT rows, "train_s"
    and the test image counts}. A run dir already under `runs` (an earlier, interrupted benchmark) is reused when
    finished and resumed when not, never trained again."""
    from fvgpt.data import index_for
    from fvgpt.evaluate import eval_features, evaluate
    from fvgpt.rundir import load_run, read_config
    from fvgpt.train import train

    index = index_for(cfg, draw=False)  # evaluation reads only the test list
    learners = list(dict.fromkeys(METHODS[n].learner for n in names))
    trained, features, results = _trained(names), {}, {}

    def scored(model) -> dict:  # one pass of the towers per distinct set of towers (CLIP's; each learner's own)
        if (key := model.towers()) not in features:
            features[key] = eval_features(model, index, cfg.eval_batch, progress=False)
        return evaluate(model, index, cfg.eval_batch, progress=False, features=features[key])

    for learner in learners:
        stage1, want = runs / learner, learner_config(cfg, learner)
        train(want, stage1, stage="prompt", resume=_reopen(stage1, want), progress=False)
        metrics = scored(load_run(stage1).model)
        counts = {"n_base": metrics["test_images"]["base"], "n_new": metrics["test_images"]["new"]}
        for name in names:
            if METHODS[name].learner == learner and METHODS[name].switches is None:
                results[name] = (metrics["models"][METHODS[name].row] | counts
                                 | {"train_s": _stage_seconds(stage1, "prompt")})
        stored, record = read_config(stage1)
        for name in [n for n in METHODS if METHODS[n].learner == learner]:
            method = METHODS[name]
            if method.switches is None or not (name in names or name in trained):
                continue
            run, want = runs / name, replace(stored, **method.switches)
            if not _reopen(run, want):
                _copy_run(runs / method.shares if method.shares else stage1, run, want, record)
            if not method.shares:
                train(want, run, stage="plugin", resume=True, progress=False)
            if name in names:
                metrics = scored(load_run(run).model)
                (run / "metrics.json").write_text(json.dumps(metrics, indent=1))
                results[name] = (metrics["models"]["fvgpt"] | counts
                                 | {"gates": metrics["gates"], "train_s": _stage_seconds(run, "plugin")})
        if progress:
            print(f"  {learner} and its FVG-PT rows done", flush=True)
    return results


def _value(row: dict, metric: str) -> float:
    return row["d_fg"]["tau1"] if metric == "d_fg" else row[metric]


def binomial_se(percent: float, n: int) -> float:
    """Standard error, in points, of an accuracy measured on n test images: 100·√(p(1 − p)/n). The seeds share
    the test set, so this is the test set's sampling error of the mean over seeds too."""
    p = percent / 100
    return 100 * math.sqrt(p * (1 - p) / n) if n else float("nan")


def hm_se(base: float, new: float, se_base: float, se_new: float) -> float:
    """SE of HM = 2BN/(B + N) by the delta method, Base and New measured on disjoint images."""
    if base + new == 0:
        return 0.0
    d_base, d_new = 2 * new ** 2 / (base + new) ** 2, 2 * base ** 2 / (base + new) ** 2
    return math.sqrt((d_base * se_base) ** 2 + (d_new * se_new) ** 2)


def summarise(cells: dict[int, dict[str, dict]]) -> dict:
    """{method: {metric: {"mean", "std"}}} over seeds (std: sample standard deviation, ddof = 1), with the binomial
    SE beside the means of base, new and hm."""
    out = {}
    for method in [m for m in METHODS if all(m in cell for cell in cells.values())]:
        rows = list(cells.values())
        out[method] = {}
        for metric in METRICS:
            values = np.array([_value(row[method], metric) for row in rows])
            out[method][metric] = {"mean": round(float(values.mean()), 4),
                                   "std": round(float(values.std(ddof=1)), 4) if len(values) > 1 else 0.0}
        n_base, n_new = rows[0][method]["n_base"], rows[0][method]["n_new"]
        base, new = out[method]["base"]["mean"], out[method]["new"]["mean"]
        se_base, se_new = binomial_se(base, n_base), binomial_se(new, n_new)
        out[method]["base"]["se"], out[method]["new"]["se"] = round(se_base, 4), round(se_new, 4)
        out[method]["hm"]["se"] = round(hm_se(base, new, se_base, se_new), 4)
    return out


def world_checks(cells: dict[int, dict[str, dict]]) -> dict | None:
    """The checks (a)–(c) on zero-shot and CoOp (means over seeds, points); None without both rows."""
    rows = list(cells.values())
    if not all("zero_shot" in r and "coop" in r for r in rows):
        return None

    def mean(method: str, metric: str) -> float:
        return float(np.mean([r[method][metric] for r in rows]))

    values = {"a": mean("coop", "new") - mean("zero_shot", "new"),
              "b": mean("zero_shot", "base_fg") - mean("zero_shot", "base"),
              "c": mean("coop", "base") - mean("zero_shot", "base")}
    out = {}
    for key, (what, limit, sign) in CHECKS.items():
        ok = values[key] <= limit if sign == "≤" else values[key] >= limit
        out[key] = {"what": what, "value": round(values[key], 4), "need": f"{sign} {limit:+g}", "pass": bool(ok)}
    out["zero_shot"] = {m: round(mean("zero_shot", m), 4) for m in ("base", "base_fg", "new")}
    out["coop"] = {m: round(mean("coop", m), 4) for m in ("base", "new")}
    out["pass"] = all(out[k]["pass"] for k in CHECKS)
    return out


def _pool(stats: list[dict | None], key: str = "mean") -> float | None:
    """The mean over seeds of a per-seed statistic, weighted by its image count (None where no seed has one)."""
    kept = [s for s in stats if s]
    n = sum(s["n"] for s in kept)
    return round(sum(s[key] * s["n"] for s in kept) / n, 4) if n else None


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def gate_summary(cells: dict[int, dict[str, dict]]) -> dict:
    """Per trained FVG-PT row, pooled over seeds: r against r*, and b on base and new test images."""
    out = {}
    for method in [m for m in _trained(list(METHODS)) if all(m in cell for cell in cells.values())]:
        frg = [cell[method]["gates"]["frg"] for cell in cells.values()]
        brg = [cell[method]["gates"]["brg"] for cell in cells.values()]
        out[method] = {
            "r_mean": _pool([g["r"] for g in frg]), "r_std": _pool([g["r"] for g in frg], "std"),
            "r_star_rate": _mean([g["r_star_rate"] for g in frg]),
            "r_when_r_star_1": _pool([g["r_when_r_star_1"] for g in frg]),
            "r_when_r_star_0": _pool([g["r_when_r_star_0"] for g in frg]),
            "agreement": _mean([g["agreement"] for g in frg]),
            **{f"b_{split}": _pool([g[split]["b"] for g in brg]) for split in ("base", "new")},
            **{f"b_{split}_std": _pool([g[split]["b"] for g in brg], "std") for split in ("base", "new")},
            "b_new_when_only_clip_right": _pool([g["new"]["b_when_only_clip_right"] for g in brg]),
            "b_new_when_only_full_right": _pool([g["new"]["b_when_only_full_right"] for g in brg]),
        }
    return out


def markdown(summary: dict, rate: float) -> str:
    lines = [f"correlation {rate:g}: mean ± std over seeds (binomial SE of the mean)", "",
             "| method | paper's row | Base | New | HM | D_fg (τ = 1) |", "|---|---|---|---|---|---|"]
    for method, row in summary.items():
        cells = [f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f} ({row[m]['se']:.2f})" if m != "d_fg"
                 else f"{row[m]['mean']:.4f} ± {row[m]['std']:.4f}" for m in METRICS]
        lines.append(f"| {method} | {METHODS[method].paper or '—'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_markdown(checks: dict | None) -> str:
    if checks is None:
        return "world checks: need the zero_shot and coop rows"
    lines = ["| check | what | value | need | pass |", "|---|---|---|---|---|"]
    for key in CHECKS:
        c = checks[key]
        lines.append(f"| ({key}) | {c['what']} | {c['value']:+.2f} | {c['need']} | {'yes' if c['pass'] else 'NO'} |")
    return "\n".join(lines)


def gates_markdown(gates: dict) -> str:
    lines = [("| variant (means) | r | r where r* = 1 | r where r* = 0 | r* rate | agreement (r > ½ ⇔ r*) | b base "
              "| b new | b new, only CLIP right | b new, only z_full right |"), "|" + "---|" * 10]

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
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 5), gridspec_kw={"width_ratios": [3, 2]})
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
    for method in [m for m in methods if all(m in report["sensitivity"][f"{r:g}"] for r in rates)]:
        rows = [report["sensitivity"][f"{r:g}"][method]["hm"] for r in rates]
        right.errorbar(rates, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], marker="o", capsize=3,
                       label=method)
    right.set_xlabel("training-image scene correlation with the class")
    right.set_ylabel("HM (%)")
    right.set_title("HM against the correlation rate")
    right.grid(True, alpha=0.3)
    right.legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"generated world {s['world_seed']} ({s['split']} split, distractors {s['distractors']:g}): "
                 f"{s['classes']} classes, {s['shots']} shots, {s['test_images']} test images per split, "
                 f"{s['steps']['plugin']} steps per stage, {s['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run(args) -> dict:
    import torch

    from fvgpt.config import PER_METHOD, TrainConfig
    from fvgpt.world import WORLD_MODEL, TaskSpec, base_classes, from_args, make_task, world_train_settings

    torch.set_num_threads(args.threads)
    ckpt = checkpoint(args.pretrained)
    out = Path(args.out)
    overrides = {}
    if args.quick:
        overrides = {k: QUICK[k] for k in ("classes", "shots", "test_images")}
        args.seeds, args.sensitivity, args.steps = QUICK["seeds"], QUICK["sensitivity"], QUICK["steps"]
    main_spec = from_args(TaskSpec, args, **overrides)
    rates = [main_spec.correlation] + [r for r in args.sensitivity if r != main_spec.correlation]
    reused = finished_runs(out / "runs")
    if reused:
        print(f"reusing {reused} finished runs under {out / 'runs'}", flush=True)
    settings = world_train_settings(main_spec, args.steps)
    if args.epochs:
        settings |= {"prompt_epochs": args.epochs, "plugin_epochs": args.epochs}
    load_start, t_start, started = load_average(), time.perf_counter(), utc_now()
    per_rate: dict[str, dict[int, dict[str, dict]]] = {}
    for rate in rates:
        names = [n for n in args.methods if rate == main_spec.correlation or METHODS[n].every_rate]
        per_rate[f"{rate:g}"] = cells = {}
        for seed in args.seeds:
            spec = replace(main_spec, correlation=rate, draw=seed)
            task = make_task(out / "tasks" / f"corr{rate:g}-seed{seed}", spec)
            cfg = TrainConfig(**settings, data=str(task), pretrained=str(ckpt), shots=spec.shots, seed=seed,
                              base_classes=base_classes(task))
            print(f"correlation {rate:g}, seed {seed}", flush=True)
            cells[seed] = run_cell(cfg, out / "runs" / f"corr{rate:g}-seed{seed}", names, progress=not args.quick)
    seconds = time.perf_counter() - t_start
    main_key = f"{main_spec.correlation:g}"
    rows = [{"correlation": float(rate), "method": m, "seed": seed,
             **{metric: round(_value(row, metric), 4) for metric in METRICS},
             "base_fg": round(row["base_fg"], 4), "train_s": round(row["train_s"], 2)}
            for rate, cells in per_rate.items() for seed, cell in cells.items() for m, row in cell.items()]
    train = TrainConfig(**settings, data="task")
    images = math.ceil(main_spec.classes / 2) * main_spec.shots
    per_learner = {learner: learner_config(train, learner) for learner in LEARNERS
                   if any(METHODS[m].learner == learner for m in args.methods)}
    batches = math.ceil(images / train.prompt_batch)
    return {
        "methods": summarise(per_rate[main_key]),
        "world_checks": {rate: world_checks(cells) for rate, cells in per_rate.items()},
        "sensitivity": {rate: summarise(cells) for rate, cells in per_rate.items()},
        "gates": {rate: gate_summary(cells) for rate, cells in per_rate.items()},
        "per_seed": rows,
        "settings": {**{k: v for k, v in vars(main_spec).items() if k != "draw"}, "seeds": args.seeds,
                     "rates": rates, "methods": args.methods, "model": WORLD_MODEL, "pretrained": str(ckpt),
                     "quick": args.quick,
                     "steps": {"prompt": train.prompt_epochs * batches, "plugin": train.plugin_epochs * batches},
                     "train": {k: v for k, v in train.to_dict().items() if k not in UNRECORDED},
                     "per_learner": {learner: {k: getattr(c, k) for k in (*PER_METHOD, "gpa_mean", "gpa_std")}
                                     | {"steps": {"prompt": c.prompt_epochs * math.ceil(images / c.prompt_batch),
                                                  "plugin": c.plugin_epochs * math.ceil(images / c.plugin_batch)}}
                                     for learner, c in per_learner.items()},
                     "threads": args.threads, "std": "sample standard deviation over seeds (ddof = 1)",
                     "se": "binomial standard error of the mean accuracy on the split's test images (shared by the "
                           "seeds); HM's by the delta method",
                     "d_fg": "KL(p_full ‖ p_fg) at τ = 1 of each row's base head, mean over base test images"},
        "reused_runs": reused, "command": command_line(), "started_utc": started, "seconds": round(seconds, 1),
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
    tables = [markdown(report["sensitivity"][rate], float(rate)) + "\n\nworld checks:\n\n"
              + checks_markdown(report["world_checks"][rate]) + "\n\ngates (pooled over seeds):\n\n"
              + gates_markdown(report["gates"][rate]) for rate in report["sensitivity"]]
    (out / "method.md").write_text("\n\n".join(tables) + "\n")
    json_path, csv_path = write_outputs(out, "method", report, report["per_seed"])
    print("\n\n".join(tables))
    print(f"\n{report['seconds']:.0f} s, load average {report['load_average']}; wrote {json_path}, {csv_path}, "
          f"{out / 'method.md'}" + ("" if reason else f", {png}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
