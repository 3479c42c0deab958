"""`fvgpt classify BUNDLE | --repository DIR [--models a,b|*] --input PATH... --out OUT` (docs/batch.md).

The driver resolves and verifies every classifier once (the actors load them unverified), checks the labels and
top_k against each, expands the inputs and checks --out before Ray starts, so a usage error exits 2 with one line
and costs no Ray start-up."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from fvgpt_runtime.images import MAX_IMAGE_BYTES, PixelLimits
from fvgpt_runtime.label_sets import DEFAULT_TOP_K

from .shards import JobRecord

FORMATS = ("parquet", "csv")


def register(sub) -> None:
    p = sub.add_parser("classify", help="classify folders, globs or tables of images to Parquet shards on Ray Data "
                                        "(local, or a Ray cluster)",
                       description="Classifies every image of --input with one bundle, or with several classifiers "
                                   "of a model repository (one tower pass per image for all classifiers on a "
                                   "backbone), and writes Parquet (or CSV) shards to --out: per image and "
                                   "classifier its path, model, version, tower_id, head, top-k labels and "
                                   "probabilities, and an error column (a missing, unreadable or oversized image is "
                                   "a row with its error, never a failed job). Runs on a local Ray instance unless "
                                   "--address or RAY_ADDRESS names a cluster (the bundles must then be at the same "
                                   "path on every node: shared storage). Finished shards are kept: after Ctrl-C or "
                                   "a crash the same command continues where it stopped. The numbers are the "
                                   "Python API's and the server's (same code, same tower variant). Needs the "
                                   "`batch` extra: pip install 'fvgpt-serve[cpu,batch]'.",
                       epilog="example: fvgpt classify bundles/pets --input photos/ 'more/**/*.jpg' list.parquet "
                              "--out results/")
    p.add_argument("bundle", nargs="?", help="bundle dir (or REPOSITORY/NAME[@VERSION])")
    p.add_argument("--repository", metavar="DIR", help="a model repository (DIR/NAME/VERSION/); with --models")
    p.add_argument("--models", default="*", help="with --repository: classifiers as NAME or NAME@VERSION, "
                                                 "comma-separated, or * for every classifier's highest version "
                                                 "(default *)")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="folders (recursive), globs (quote them; ** recurses), image files, or .parquet/.csv tables "
                        "with a column of paths or (Parquet) image bytes")
    p.add_argument("--column", help="the table column with the paths or bytes (default: path, image or bytes)")
    p.add_argument("--out", required=True, help="output folder: part-NNNNN.parquet shards, job.json, summary.json")
    p.add_argument("--format", choices=FORMATS, default="parquet",
                   help="shard format (default parquet; csv writes list columns as JSON)")
    p.add_argument("--labels", help="comma-separated labels to score (default: each bundle's classes); new labels "
                                    "go through the bundle's text graph, as in POST /classify")
    p.add_argument("--top-k", type=int, help=f"ranked labels per row (default {DEFAULT_TOP_K}, or every label when "
                                             f"fewer)")
    p.add_argument("--all-probabilities", action="store_true",
                   help="also write every label's probability (column all_probabilities, in the label order of "
                        "the shard metadata)")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default 10000)")
    p.add_argument("--runtime", choices=("auto", "onnx", "openvino", "tensorrt"), default="auto",
                   help="tower runtime (default: the tuning profile's choice on this host, as `fvgpt serve`)")
    p.add_argument("--precision", help="tower precision (default: the tuning profile's, else the bundle's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per tower run (default 32)")
    p.add_argument("--address", help="Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--actors", type=int, help="tower actors, one per node while there are enough nodes (default: "
                   "one on each Ray node with --actor-cpus CPUs)")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="CPUs Ray reserves per tower actor (default 1; fractional allowed; decode tasks take 0.5 "
                        "each, so leave them room)")
    p.add_argument("--decode-tasks", type=int, help="decode tasks running at once (default: one per actor; one CPU "
                   "decodes ~400 photos/s: raise it for towers faster than that, such as GPUs)")
    p.add_argument("--threads", type=int, help="tower threads per actor (default: one per core of its node)")
    p.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES,
                   help=f"larger image files are error rows, not read (default {MAX_IMAGE_BYTES})")
    p.add_argument("--max-image-pixels", type=int, default=PixelLimits.max_image_pixels,
                   help=f"width × height limit, checked before decoding (default {PixelLimits.max_image_pixels})")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_classify)


def _usage(args) -> None:
    if bool(args.bundle) == bool(args.repository):
        raise ValueError("give a bundle, or --repository DIR (with --models), not both and not neither")
    for name in ("shard_size", "batch_size", "max_image_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("actors", "decode_tasks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.actor_cpus <= 1024:
        raise ValueError("--actor-cpus must be above 0")


def _classify(args) -> int:
    _usage(args)
    from fvgpt_runtime.classifier import Classifier
    from fvgpt_runtime.images import InputError
    from fvgpt_runtime.label_sets import top_k as k_of
    from fvgpt_runtime.repository import latest, locate, pick, scan

    from .inputs import expand
    from .stages import Model

    if missing := [m for m in ("ray", "pyarrow", "pandas") if importlib.util.find_spec(m) is None]:
        raise ValueError(f"`fvgpt classify` needs Ray Data and pyarrow ({', '.join(missing)} missing): pip install "
                         f"'fvgpt-serve[cpu,batch]'")
    if args.repository:
        source = Path(args.repository)
        if not source.is_dir():
            raise ValueError(f"--repository {source} is not a folder")
        if args.models.strip() == "*":
            names = sorted({f.name for f in scan(source, single=False)})
            found = [f for f in (latest(scan(source, single=False), n) for n in names) if f is not None]
            if not found:
                raise ValueError(f"{source} holds no usable classifier (DIR/NAME/VERSION/manifest.json)")
        else:
            found = [pick(source, ref.strip()) for ref in args.models.split(",") if ref.strip()]
    else:
        found = [locate(args.bundle)]
    labels = [t.strip() for t in args.labels.split(",") if t.strip()] if args.labels else None
    models = []
    for f in found:
        c = Classifier(f, args.runtime, args.precision, verify=True)  # verified once, here
        try:
            chosen = c.label_set(labels)
            k = k_of(args.top_k, len(chosen or c.labels), DEFAULT_TOP_K)
        except InputError as exc:
            raise ValueError(f"{f.name}@{f.version}: {exc}") from None
        models.append(Model(f.name, f.version, str(f.path.resolve()), c.info.model_id, c.tower_id, c.choice.runtime,
                            c.choice.precision, chosen, k))
        print(f"{f.name}@{f.version}: {c.info.kind}, {c.info.classes} classes, tower {c.choice.runtime}-"
              f"{c.choice.precision} ({c.choice.reason})", file=sys.stderr)
    items = expand(args.input, args.column)
    record = JobRecord(items=len(items), digest=items.digest(),
                       models=[{"name": m.name, "version": m.version, "model_id": m.model_id,
                                "tower_id": m.tower_id} for m in models],
                       labels=labels, top_k=args.top_k, all_probabilities=args.all_probabilities, format=args.format,
                       shard_size=args.shard_size)
    from .job import Settings, run

    settings = Settings(address=args.address, actors=args.actors, actor_cpus=args.actor_cpus,
                        decode_tasks=args.decode_tasks, threads=args.threads,
                        batch_size=args.batch_size, limits=PixelLimits(max_image_pixels=args.max_image_pixels),
                        max_image_bytes=args.max_image_bytes, progress=not args.quiet)
    summary = run(items, models, record, Path(args.out), settings)
    errors = ", ".join(f"{k} {v}" for k, v in summary["errors"].items())
    print(f"classified {summary['images']} images ({summary['skipped']} skipped as done) with {len(models)} "
          f"classifier(s): {summary['rows']} rows, errors: {errors}; {summary['wall_s']:.1f} s → {args.out}",
          file=sys.stderr)
    print(json.dumps(summary))
    return 0
