"""Which scale S should the FDC head (E6) use? The authors' code fixes S = 100 with τ = 2, for CLIP whose own logit
scale s is 100; this project's default is the backbone's s (16.3 for the world's micro-CLIP). This script measures
both in the generated world, for the FVG-PT plugin on CoOp.

    python -m benchmarks.fdc_scale [--world-seed S] [--classes N] [--split ...] [--distractors D] [--correlation R]
                                   [--seeds 1,2,3] [--scales 100] [--steps 1500] [--quick] --out DIR

The criterion, fixed before measuring: the base head's accuracy on a validation draw of base-class images (the
training distribution: another draw of `--val-shots` images per base class from the same world, scenes correlated at
the same rate; never the test images), mean over seeds; another S replaces the backbone's s only if it is ahead by
more than the binomial SE of the difference. Reported beside it, and not used for the choice: zero-shot- and
CoOp-only statistics of the scale (the entropy of the teachers' p = softmax(z/τ) on the validation images, and the
logit scale at which CoOp's and zero-shot CLIP's cosines would be calibrated there, the minimiser of their NLL), the
base head's entropy and NLL at each S, and the test rows of fvgpt.evaluate.

Writes DIR/fdc_scale.json and fdc_scale.md.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

if not __package__:  # `python benchmarks/fdc_scale.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import BenchError, command_line, library_versions, load_average, machine_info, utc_now
from benchmarks.method import binomial_se, checkpoint, seed_list


def build_parser() -> argparse.ArgumentParser:
    from fvgpt.world import STAGE_STEPS, TaskSpec, add_options

    p = argparse.ArgumentParser(prog="python -m benchmarks.fdc_scale", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the world's tasks")
    add_options(g, TaskSpec, skip=("draw",))
    g = p.add_argument_group("the measurement")
    g.add_argument("--seeds", type=seed_list, default=[1, 2, 3], help="seeds (default: 1,2,3)")
    g.add_argument("--scales", default="100", help="values of S besides the backbone's s (default: 100)")
    g.add_argument("--val-shots", type=int, default=64, help="validation images per base class (default: 64)")
    g.add_argument("--steps", type=int, default=STAGE_STEPS, help=f"steps per stage (default: {STAGE_STEPS})")
    g.add_argument("--pretrained", help="micro-CLIP checkpoint (default: the committed one)")
    g.add_argument("--quick", action="store_true", help="a smoke run: 4 classes, 2 shots, 8 test images, 1 step")
    g.add_argument("--out", required=True, help="results folder (tasks/ and runs/ go under it)")
    return p


def nll_optimal_scale(cosines: np.ndarray, targets: np.ndarray) -> float:
    """The scale t minimising the mean cross-entropy of t·cosines (temperature scaling), on a log grid 1–1000."""
    grid = np.exp(np.linspace(0, math.log(1000), 400))
    z = cosines[None] * grid[:, None, None]
    z = z - z.max(-1, keepdims=True)
    nll = (np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, targets[None, :, None], -1)[..., 0]).mean(-1)
    return float(grid[nll.argmin()])


def _entropy(z, tau: float) -> float:
    import torch

    log_p = torch.log_softmax(z.float() / tau, -1)
    return float(-(log_p.exp() * log_p).sum(-1).mean())


def measure_seed(cfg, val_index, test_index, scales: dict[str, float | None], runs: Path) -> dict:
    """Stage 1 once; stage 2 per S; the validation and test numbers of each."""
    import torch
    import torch.nn.functional as F

    from fvgpt.evaluate import eval_features, evaluate
    from fvgpt.rundir import load_run, read_config, write_config
    from fvgpt.train import train

    stage1 = train(cfg, runs / "coop", stage="prompt", progress=False)
    coop = load_run(stage1).model
    val = eval_features(coop, val_index, cfg.eval_batch, progress=False)
    test = eval_features(coop, test_index, cfg.eval_batch, progress=False)
    split = coop.classes
    target = torch.tensor(split.position)[val.labels]
    tables = coop.tables(split.base_names)
    f_unit = val.f
    teachers = coop.heads(f_unit, tables)
    out = {"teachers": {"entropy_p_full": _entropy(teachers.z_full, cfg.tau),
                        "entropy_p_clip": _entropy(teachers.z_clip, cfg.tau),
                        "entropy_p_fg": _entropy(coop.logits(val.f_fg, tables.learned), cfg.tau),
                        "uniform_entropy": math.log(len(split.base_names)),
                        "nll_optimal_scale_coop": nll_optimal_scale((f_unit @ tables.learned.t()).numpy(),
                                                                    target.numpy()),
                        "nll_optimal_scale_zero_shot": nll_optimal_scale((f_unit @ tables.clip.t()).numpy(),
                                                                         target.numpy())},
           "scales": {}}
    for name, scale in scales.items():
        run = runs / f"fvgpt-S{name}"
        shutil.copytree(stage1, run)
        stored, record = read_config(run)
        variant = replace(stored, fdc_logit_scale=scale)
        write_config(run, variant, replace(record, fdc_logit_scale=scale or record.logit_scale))
        t0 = time.perf_counter()
        train(variant, run, stage="plugin", resume=True, progress=False)
        model = load_run(run).model
        z_fdc = model.heads(val.f, tables).z_fdc
        val_acc = float((z_fdc.argmax(-1) == target).float().mean() * 100)
        out["scales"][name] = {
            "S": model.plugin.logit_scale, "train_s": round(time.perf_counter() - t0, 1),
            "validation": {"base": val_acc, "n": len(target), "nll": float(F.cross_entropy(z_fdc, target)),
                           "entropy_p_fdc": _entropy(z_fdc, cfg.tau)},
            "test": evaluate(model, test_index, cfg.eval_batch, progress=False, features=test)["models"]}
    return out


def run(args) -> dict:
    import torch

    from fvgpt.config import TrainConfig
    from fvgpt.data import load_index
    from fvgpt.world import TaskSpec, base_classes, from_args, make_task, world_train_settings

    torch.set_num_threads(1)
    ckpt = checkpoint(args.pretrained)
    out = Path(args.out)
    if (out / "runs").exists():
        raise BenchError(f"{out / 'runs'} exists from an earlier run; choose another --out or remove it")
    quick = {"classes": 4, "shots": 2, "test_images": 8} if args.quick else {}
    spec = from_args(TaskSpec, args, **quick)
    steps = 1 if args.quick else args.steps
    scales = {"s": None} | {f"{float(v):g}": float(v) for v in args.scales.split(",") if v.strip()}
    t_start, load_start = time.perf_counter(), load_average()
    per_seed = {}
    for seed in args.seeds:
        task = make_task(out / "tasks" / f"seed{seed}", replace(spec, draw=seed))
        val_task = make_task(out / "tasks" / f"val-seed{seed}", replace(spec, draw=1000 + seed,
                                                                        shots=2 if args.quick else args.val_shots))
        cfg = TrainConfig(**world_train_settings(spec, steps), data=str(task), pretrained=str(ckpt), shots=spec.shots,
                          seed=seed, base_classes=base_classes(task))
        val_index = load_index(val_task, 2 if args.quick else args.val_shots, seed)
        base = set(base_classes(task))
        val_index = replace(val_index, test=[s for s in val_index.train if val_index.classnames[s.label] in base])
        print(f"seed {seed}", flush=True)
        per_seed[seed] = measure_seed(cfg, val_index, load_index(task, spec.shots, seed, draw=False), scales,
                                      out / "runs" / f"seed{seed}")
    summary = {}
    for name in scales:
        val = [per_seed[s]["scales"][name]["validation"] for s in args.seeds]
        test = [per_seed[s]["scales"][name]["test"]["fvgpt"] for s in args.seeds]
        summary[name] = {"validation_base": float(np.mean([v["base"] for v in val])),
                         "validation_base_se": binomial_se(float(np.mean([v["base"] for v in val])),
                                                           sum(v["n"] for v in val)),
                         "validation_nll": float(np.mean([v["nll"] for v in val])),
                         "entropy_p_fdc": float(np.mean([v["entropy_p_fdc"] for v in val])),
                         **{f"test_{k}": float(np.mean([t[k] for t in test])) for k in ("base", "new", "hm")}}
    best = max(scales, key=lambda n: summary[n]["validation_base"])
    diff = summary[best]["validation_base"] - summary["s"]["validation_base"]
    se_diff = math.hypot(summary[best]["validation_base_se"], summary["s"]["validation_base_se"])
    choice = best if diff > se_diff else "s"
    teachers = {k: float(np.mean([per_seed[s]["teachers"][k] for s in args.seeds]))
                for k in per_seed[args.seeds[0]]["teachers"]}
    return {"summary": summary, "teachers": teachers,
            "choice": {"S": choice, "validation_difference": diff, "se_of_difference": se_diff,
                       "rule": "the S with the best validation Base replaces s only if ahead by more than the SE"},
            "per_seed": per_seed, "settings": {**vars(spec), "seeds": args.seeds, "steps": steps,
                                               "val_shots": args.val_shots, "pretrained": str(ckpt)},
            "command": command_line(), "started_utc": utc_now(), "seconds": round(time.perf_counter() - t_start, 1),
            "load_average": {"start": load_start, "end": load_average()}, "machine": machine_info(),
            "versions": library_versions()}


def markdown(report: dict) -> str:
    t = report["teachers"]
    lines = ["| S | validation Base (SE) | validation NLL | H(p_FDC) at τ | test Base | test New | test HM |",
             "|---|---|---|---|---|---|---|"]
    for name, s in report["summary"].items():
        lines.append(f"| {name} | {s['validation_base']:.2f} ({s['validation_base_se']:.2f}) | {s['validation_nll']:.3f} "
                     f"| {s['entropy_p_fdc']:.3f} | {s['test_base']:.2f} | {s['test_new']:.2f} | {s['test_hm']:.2f} |")
    lines += ["", f"teachers on the validation images (τ = 2): H(p_full) {t['entropy_p_full']:.3f}, H(p_fg) "
              f"{t['entropy_p_fg']:.3f}, H(p_CLIP) {t['entropy_p_clip']:.3f} (uniform {t['uniform_entropy']:.3f}); "
              f"NLL-optimal scale of CoOp's cosines {t['nll_optimal_scale_coop']:.1f}, of zero-shot's "
              f"{t['nll_optimal_scale_zero_shot']:.1f}",
              "", f"choice: S = {report['choice']['S']} (validation difference {report['choice']['validation_difference']:+.2f}, "
              f"SE {report['choice']['se_of_difference']:.2f})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from fvgpt.errors import FVGPTError

    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (BenchError, FVGPTError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "fdc_scale.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "fdc_scale.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
