"""The `fvgpt export` and `fvgpt validate` commands (registered through the fvgpt.commands entry points)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _labels(text: str) -> list[str]:
    path = Path(text)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [t.strip() for t in text.split(",") if t.strip()]


def register_export(sub) -> None:
    p = sub.add_parser("export", help="fuse a trained run (or plain CLIP) into a parity-gated ONNX/TensorRT bundle",
                       description="Writes a bundle dir in format v2 (docs/bundle-format.md): the tower graph "
                                   "(pixels → image features, shared by every bundle on the backbone), the heads "
                                   "graph (features → base and new logits), the text graph (new labels with the "
                                   "learned context), text tables, the tokenizer's vocabulary and a manifest that "
                                   "hashes every file. Every export runs the parity gate against the torch model and "
                                   "refuses to write a bundle that fails it.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", nargs="?", help="run dir from fvgpt train (omit with --zero-shot)")
    p.add_argument("--out", required=True, help="bundle dir to write")
    p.add_argument("--precision", default="fp32", help="ONNX Runtime tower precision, the server's default: fp32 | "
                                                       "int8 (CPU: int8 weights per channel, activations per token) | "
                                                       "fp16 (GPU); the fp32 tower is always kept as the reference")
    p.add_argument("--openvino", action="store_true",
                   help="also write OpenVINO tower variants (the `openvino` extra): fp32, bf16 where this CPU has bf16 "
                        "instructions, int8 by NNCF post-training quantisation; each must pass the parity gate or is "
                        "left out. `fvgpt tune` then measures them against ONNX Runtime")
    p.add_argument("--calibration-images", type=int, default=64,
                   help="generated images that calibrate OpenVINO's static int8 scales")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch the graphs/engines are built for")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset (≥ 23 exports fused Attention and Gelu ops)")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (GPU host with tensorrt)")
    p.add_argument("--explain", action="store_true",
                   help="also write the tower's explain graph (per-patch heatmaps for POST /explain) in fp32 and the "
                        "--precision, each parity-gated against torch; /classify never runs it")
    p.add_argument("--parity-images", type=int, default=96, help="generated images in the parity set (plus 4 photos)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    g = p.add_argument_group("zero-shot bundles (plain CLIP, no training)")
    g.add_argument("--zero-shot", action="store_true", help="export plain CLIP with hand-crafted prompts")
    g.add_argument("--model", default="ViT-B-16", help="open_clip model name")
    g.add_argument("--pretrained", default="openai", help="open_clip tag, local checkpoint file, or none")
    g.add_argument("--labels", type=_labels, help="a,b,c or a file with one label per line")
    p.set_defaults(func=_export)


def _export(args) -> int:
    from .build import ExportError, ExportOptions, export_run, export_zero_shot

    opts = ExportOptions(precision=args.precision, max_batch=args.max_batch, opset=args.opset,
                         tensorrt=args.tensorrt, openvino=args.openvino, explain=args.explain, force=args.force,
                         parity_images=args.parity_images, calibration_images=args.calibration_images)
    if args.zero_shot:
        if args.run:
            raise ExportError("--zero-shot builds from plain CLIP: drop the run dir argument")
        if not args.labels:
            raise ExportError("--zero-shot needs --labels a,b,c (or a file)")
        export_zero_shot(args.model, args.pretrained, args.labels, args.out, opts)
    else:
        if not args.run:
            raise ExportError("give a run dir to export, or --zero-shot with --labels")
        export_run(args.run, args.out, opts)
    return 0


def register_validate(sub) -> None:
    p = sub.add_parser("validate", help="re-check a bundle's files (sha256) and re-run its parity set",
                       description="Exit status 0 only if every file matches its sha256 and every graph still "
                                   "passes the parity gate against the reference outputs stored at export.")
    p.add_argument("bundle", help="bundle dir")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_validate)


def _validate(args) -> int:
    from .validate import format_report, validate_bundle

    report = validate_bundle(args.bundle)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["passed"] else 1


def register_tune(sub) -> None:
    p = sub.add_parser("tune", help="measure every runtime × precision of a bundle's tower here; `fvgpt serve` then "
                                    "runs the fastest that is worth its accuracy",
                       description="Re-runs the parity gate on this host for every tower variant the bundle has and "
                                   "this host can run (ONNX Runtime CPU/CUDA, OpenVINO, TensorRT), times the ones "
                                   "that pass at the batch sizes the server may form (round robin, so load hits all "
                                   "alike), and writes BUNDLE/tuning.json: host CPU model, family and flags, library "
                                   "versions, images/s and latency per candidate, the choice and why. `fvgpt serve` "
                                   "uses it when it matches the host; --runtime/--precision still override.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bundle", help="bundle dir written by fvgpt export")
    p.add_argument("--batch-sizes", default="1,2,4,8",
                   help="batch sizes to time; the largest decides (serve's --max-batch-size, default 8)")
    p.add_argument("--threads", type=int, help="threads per tower (default: the cores this process may use)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per candidate and batch size")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before them")
    p.add_argument("--precisions", help="only these precisions, e.g. fp32,bf16 for near-lossless candidates")
    p.add_argument("--runtimes", help="only these runtimes: onnx, openvino, tensorrt")
    p.add_argument("--prefer", choices=["balanced", "speed", "accuracy"], default="balanced",  # tuning.SPEED_MARGIN
                   help="balanced: the fastest candidate that is at least 1.15x as fast as every more accurate one "
                        "(more accurate: a measured logit error 1.5x smaller); speed: the fastest; accuracy: the "
                        "fastest of the most accurate. The profile records the rule and why")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress")
    p.set_defaults(func=_tune)


def _tune(args) -> int:
    from fvgpt_runtime.tuning import profile_path

    from .tune import format_profile, tune

    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if not batches or min(batches) < 1 or args.iters < 1 or args.warmup < 0 or (args.threads or 1) < 1:
        raise ValueError("--batch-sizes, --iters and --threads must be positive, --warmup not negative")
    precisions, runtimes = ([t.strip() for t in text.split(",") if t.strip()] if text else None
                            for text in (args.precisions, args.runtimes))
    profile = tune(args.bundle, batches, args.threads, args.iters, args.warmup, precisions, runtimes, not args.quiet,
                   args.prefer)
    print(json.dumps(profile, indent=2) if args.json else format_profile(profile))
    print(f"wrote {profile_path(Path(args.bundle))}")
    return 0
