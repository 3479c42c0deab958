"""Model throughput of a bundle per runtime and batch size, against plain open_clip measured in the same run.

    python -m benchmarks.throughput --bundle BUNDLE [--runtimes eager-fp32,onnx-int8] [--batch-sizes 1,8,32]

Runtimes: `eager-{fp32,fp16,bf16}` (open_clip `encode_image` + L2 norm + the head as a torch matmul against the
bundle's zero-shot text table, under inference_mode; weights rebuilt from the manifest and checked against its
fingerprint), `compile-{fp32,fp16,bf16}` (the same under torch.compile), `onnx-<precision>` (the bundle's tower graph through
the runtime), `openvino-{fp32,bf16,int8}` (its OpenVINO variants) and `tensorrt-<precision>` (its engines). eager-fp32 is
the baseline of every ratio. The report also names the tower `fvgpt serve` runs on this host (the bundle's tuning
profile, when it applies here) and its images/s against the fastest bundle runtime of the same run.

Every model figure is host to host: NumPy pixels in, NumPy outputs back (so H2D/D2H copies count on a GPU), as a
service sees it. Three stages are timed separately on the package's real JPEG photos: decode + preprocess (PIL +
NumPy, the same for every runtime), model, and heads/routing (Bundle.scores). Writes throughput.json,
throughput.csv (one row per runtime x batch, timm-style) and throughput.png.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if not __package__:  # `python benchmarks/throughput.py`: make the repo importable like `python -m` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from fvgpt_runtime.manifest import TOWER_RUNTIMES

from benchmarks.common import (BenchError, command_line, decode_batch, int_list, latency_summary, library_versions,
                               load_average, machine_info, photo_bytes, usable_cores, utc_now, write_outputs)

BASELINE = "eager-fp32"
TORCH_DTYPES = ("fp32", "fp16", "bf16")
RUNTIMES = ([f"eager-{p}" for p in TORCH_DTYPES] + [f"compile-{p}" for p in TORCH_DTYPES]
            + [f"{runtime}-{p}" for runtime, precisions in TOWER_RUNTIMES.items() for p in precisions]
            + [f"tensorrt-{p}" for p in TOWER_RUNTIMES["onnx"]])  # engines are built from the ONNX graphs
ENGINES = {"eager": "torch-eager", "compile": "torch-compile", "onnx": "onnxruntime", "openvino": "openvino",
           "tensorrt": "tensorrt"}

if TYPE_CHECKING:
    from fvgpt_runtime.bundle import Bundle
    from fvgpt_runtime.manifest import Manifest

Outputs = dict[str, np.ndarray]


@dataclass
class Runner:
    """One runtime ready to time: `run` maps a host pixel batch to host outputs."""

    name: str
    run: Callable[[np.ndarray], Outputs]
    provider: str  # where it really runs: "cpu", "cuda:0 (NVIDIA H200)", "CUDAExecutionProvider", "TensorRT"
    bundle: Bundle | None = None  # for the heads/routing stage (ONNX and TensorRT only)


def parse_runtimes(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown runtime(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: torch sees no CUDA device (a CUDA build of torch and a visible GPU needed)")
    return device


def skip_reason(name: str, device: str, manifest: Manifest, requested: bool) -> str | None:
    """Why a runtime cannot (or, when not asked for by name, should not) run here; None when it runs."""
    import torch

    kind, precision = name.split("-")
    if kind in ("eager", "compile") and device == "cpu":
        if precision == "fp16" and not _cpu_has("fp16"):
            return "this CPU has no fp16 matmul kernels (oneDNN reports none): fp16 runs emulated, many times " \
                   "slower than fp32; fp16 is measured on CUDA"
        if precision == "bf16" and not _cpu_has("bf16"):
            return "this CPU has no bf16 matmul kernels (oneDNN reports none; needs AVX-512 BF16 or AMX)"
        if kind == "compile" and not requested:
            return "torch.compile is in the default set on CUDA only (inductor compiles each batch size for " \
                   "minutes on a few CPU cores); name it in --runtimes to measure it on CPU"
    if kind in ("onnx", "openvino"):
        tower = manifest.towers["image"]
        if tower.find(kind, precision) is None:
            return f"the bundle has no {kind}-{precision} tower graph (has: {', '.join(tower.variants)})"
    if kind == "openvino":
        from fvgpt_runtime.openvino import OpenVINOUnavailable, unsupported

        try:
            return unsupported(precision)
        except OpenVINOUnavailable as exc:
            return str(exc)
    if kind == "onnx" and device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu, the `gpu` extra); " \
                   "use --device cpu to measure ONNX Runtime on the CPU"
    if kind == "tensorrt":
        engines = (manifest.tensorrt or {}).get("image", {})
        if precision not in engines:
            return f"the bundle has no {precision} TensorRT engine (has: {', '.join(engines) or 'none'}; " \
                   f"export with --tensorrt on a GPU host)"
        if device != "cuda" or not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU"
    return None


def _cpu_has(dtype: str) -> bool:
    import torch

    probe = getattr(torch.ops.mkldnn, f"_is_mkldnn_{dtype}_supported", None)
    return bool(probe and probe())


def count_flops(model, size: int) -> int:
    """FLOPs of the image tower for one image. MHA's fused fast path and the fused SDPA CPU kernel are invisible to
    FlopCounterMode, so they are switched off while counting (the math path counts attention as bmm)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
            model.encode_image(torch.zeros(1, 3, size, size, device=model.logit_scale.device))
        return int(counter.get_total_flops())
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def load_baseline(manifest: Manifest, device: str):
    """The open_clip model the bundle was exported from, rebuilt from the manifest; refuses different weights."""
    from fvgpt.backbone import load_backbone

    m = manifest.backbone
    backbone = load_backbone(m.name, m.pretrained, device, m.init_seed)
    if (found := backbone.fingerprint()) != m.fingerprint:
        raise BenchError(f"the open_clip baseline rebuilt from the manifest ({m.name}, pretrained={m.pretrained}"
                         f", init_seed={m.init_seed}) has weights fingerprint {found[:16]}…, but the bundle "
                         f"was exported from {m.fingerprint[:16]}…: the baseline would not be the same model")
    return backbone


def torch_runner(name: str, backbone, table: np.ndarray, logit_scale: float, device: str) -> Runner:
    """open_clip eager (or compiled): encode_image + L2 norm + scaled matmul against the zero-shot text table."""
    import torch

    kind, precision = name.split("-")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = backbone.model if dtype == torch.float32 else copy.deepcopy(backbone.model).to(dtype)
    text = torch.from_numpy(table).to(device, dtype)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = model.encode_image(x, normalize=True)
        return features, logit_scale * features @ text.t()

    step = torch.compile(forward, dynamic=False) if kind == "compile" else forward

    def run(pixels: np.ndarray) -> Outputs:
        with torch.inference_mode():
            features, logits = step(torch.from_numpy(pixels).to(device, dtype))
            return {"features": features.float().cpu().numpy(), "logits": logits.float().cpu().numpy()}

    where = f"cuda:0 ({torch.cuda.get_device_name(0)})" if device == "cuda" else "cpu"
    return Runner(name, run, where)


def bundle_runner(name: str, path: Path, device: str, threads: int, verify: bool) -> Runner:
    """The bundle's tower on one runtime; its heads (CPU ONNX Runtime) are timed as their own stage."""
    from fvgpt_runtime.bundle import Bundle

    kind, precision = name.split("-")
    bundle = Bundle(path, verify=verify, threads=threads)
    tower = bundle.tower(precision, kind, "cpu" if kind == "openvino" else device, threads)
    return Runner(name, lambda pixels: {"features": tower(pixels)}, tower.provider, bundle)


def time_calls(fn: Callable, arg, warmup: int, iters: int, tick: Callable[[], None]) -> tuple[float, list[float]]:
    """(seconds of the first call, seconds of each timed call). The first call carries one-off costs (compile,
    allocator growth, ORT's first-run planning), so it is reported apart and never timed."""
    times = []
    first = 0.0
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        fn(arg)
        elapsed = time.perf_counter() - t0
        if i == 0:
            first = elapsed
        if i >= warmup:
            times.append(elapsed)
        tick()
    return first, times


def _parity(manifest: Manifest, runner: Runner) -> float | None:
    """Worst end-to-end top-1 agreement with the torch model found by the export's parity gate, for the tower being
    timed."""
    if runner.bundle is None:
        return None
    kind, precision = runner.name.split("-")
    name = f"end_to_end_{precision if kind == 'onnx' else f'{kind}_{precision}'}"
    report = manifest.parity.get("checks", {}).get(name) or {}
    agreement = report.get("top1_agreement") or {}
    return float(min(agreement.values())) if agreement else None


def measure(runner: Runner, batch: int, pixels: np.ndarray, args, flops: int, preprocess_s: float, manifest: Manifest,
            tick: Callable[[], None]) -> dict:
    x = pixels[:batch]
    first, times = time_calls(runner.run, x, args.warmup, args.iters, tick)
    model_s = sum(times) / len(times)
    heads_s = None
    if runner.bundle is not None:
        out = runner.run(x)
        _, head_times = time_calls(runner.bundle.scores, out["features"], 1, args.iters, lambda: None)
        heads_s = sum(head_times) / len(head_times)
    images_per_s = batch * len(times) / sum(times)
    kind, precision = runner.name.split("-")
    pipeline_s = preprocess_s + model_s + (heads_s or 0.0)
    return {
        "runtime": runner.name, "engine": ENGINES[kind],
        "precision": precision, "provider": runner.provider, "batch_size": batch, "img_size": pixels.shape[-1],
        "threads": args.threads, "iters": len(times),
        "images_per_s": images_per_s, **latency_summary(times),
        "gflops_per_image": flops / 1e9, "gflops_per_s": flops * images_per_s / 1e9,
        "ratio_to_baseline": None,  # filled once the baseline row of this batch size exists
        "preprocess_ms_per_image": 1000 * preprocess_s / batch, "model_ms_per_image": 1000 * model_s / batch,
        "heads_ms_per_image": None if heads_s is None else 1000 * heads_s / batch,
        "pipeline_images_per_s": batch / pipeline_s, "first_call_ms": 1000 * first,
        "parity_top1_agreement": _parity(manifest, runner),
    }


def plot(rows: list[dict], path: Path, title: str) -> str | None:
    """Throughput vs batch per runtime, and where the time of one image goes at the largest batch. Returns the
    reason when no plot can be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]')"
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    batches = sorted({r["batch_size"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    for name in runtimes:
        mine = sorted((r for r in rows if r["runtime"] == name), key=lambda r: r["batch_size"])
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if name == BASELINE else {}
        left.plot([r["batch_size"] for r in mine], [r["images_per_s"] for r in mine], marker="o", label=name, **style)
    left.set_xscale("log", base=2)
    left.set_xticks(batches, [str(b) for b in batches])
    left.set_xlabel("batch size")
    left.set_ylabel("images/s (model stage)")
    left.set_title("throughput vs batch (dashed: open_clip eager fp32 baseline)")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    last = {r["runtime"]: r for r in rows if r["batch_size"] == batches[-1]}
    bottom = np.zeros(len(last))
    for key, label in (("preprocess_ms_per_image", "decode+preprocess"), ("model_ms_per_image", "model"),
                       ("heads_ms_per_image", "heads/routing")):
        values = np.array([last[n][key] or 0.0 for n in last])
        right.bar(list(last), values, bottom=bottom, label=label)
        bottom += values
    right.set_ylabel("ms per image")
    right.set_title(f"where the time goes (batch {batches[-1]})")
    right.tick_params(axis="x", rotation=30, labelsize=8)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def markdown_table(rows: list[dict]) -> str:
    head = ("| runtime | provider | batch | images/s | p50 ms | p95 ms | p99 ms | GFLOP/s | x baseline | "
            "preprocess ms/img | model ms/img | heads µs/img |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = "—" if r["ratio_to_baseline"] is None else f"{r['ratio_to_baseline']:.2f}"
        heads = "—" if r["heads_ms_per_image"] is None else f"{1000 * r['heads_ms_per_image']:.2f}"
        lines.append(f"| {r['runtime']} | {r['provider']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
                     f"{r['latency_ms_p50']:.1f} | {r['latency_ms_p95']:.1f} | {r['latency_ms_p99']:.1f} | "
                     f"{r['gflops_per_s']:.0f} | {ratio} | {r['preprocess_ms_per_image']:.2f} | "
                     f"{r['model_ms_per_image']:.2f} | {heads} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle dir written by `fvgpt export`")
    p.add_argument("--runtimes", type=parse_runtimes,
                   help=f"comma-separated, from: {', '.join(RUNTIMES)}. Default: every runtime available here; the "
                        f"ones left out are listed with the reason. {BASELINE} (the baseline) is always measured")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32], help="comma-separated batch sizes "
                                                                            "(default 1,8,32)")
    p.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime "
                                               "(default: the cores this process may use)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where torch and ONNX Runtime run (default auto: cuda when torch sees a GPU)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per runtime and batch size (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations before them; at least 1 (default 3)")
    p.add_argument("--out", default="runs/benchmarks", help="folder for throughput.json, .csv and .png "
                                                            "(default runs/benchmarks)")
    return p


def run(args) -> dict:
    from fvgpt_runtime.manifest import Manifest

    path = Path(args.bundle)
    if not path.exists():
        raise BenchError(f"bundle {path} does not exist")
    manifest = Manifest.read(path)  # before the heavy imports: a wrong path fails at once

    import torch
    from safetensors.numpy import load_file
    from tqdm import tqdm

    device = resolve_device(args.device)
    load_start = load_average()
    torch.set_num_threads(args.threads)
    names = args.runtimes or RUNTIMES
    if BASELINE not in names:
        print(f"note: {BASELINE} added: it is the baseline every ratio refers to", file=sys.stderr)
    names = [BASELINE] + [n for n in names if n != BASELINE]
    skipped = [{"runtime": n, "reason": r} for n in names
               if (r := skip_reason(n, device, manifest, args.runtimes is not None and n in args.runtimes))]
    names = [n for n in names if n not in {s["runtime"] for s in skipped}]
    if skipped:
        print(f"skipping {', '.join(s['runtime'] for s in skipped)} (reasons at the end and in the JSON)",
              file=sys.stderr)

    backbone = load_baseline(manifest, device)
    table = load_file(str(path / manifest.tables))["clip"]
    cfg = manifest.preprocess
    flops = count_flops(backbone.model, cfg.size)
    photos = photo_bytes()
    batches = args.batch_sizes
    pixels = decode_batch(photos, max(batches), cfg)

    steps = (args.warmup + args.iters) * len(batches) * (len(names) + 1)
    bar = tqdm(total=steps, desc="benchmark", unit="it", file=sys.stderr, dynamic_ncols=True, disable=None)
    tick = functools.partial(bar.update, 1)
    preprocess_s = {}
    for b in batches:
        bar.set_description(f"decode+preprocess b{b}")
        _, times = time_calls(lambda n: decode_batch(photos, n, cfg), b, args.warmup, args.iters, tick)
        preprocess_s[b] = sum(times) / len(times)

    rows: list[dict] = []
    verified = False
    for name in names:
        try:
            if name.startswith(("eager", "compile")):
                runner = torch_runner(name, backbone, table, manifest.backbone.logit_scale, device)
            else:
                runner = bundle_runner(name, path, device, args.threads, verify=not verified)
                verified = True
        except Exception as exc:  # a runtime that fails to load is reported, the others still run
            skipped.append({"runtime": name, "reason": f"failed to load: {type(exc).__name__}: {exc}"})
            print(f"skipped {name}: {skipped[-1]['reason']}", file=sys.stderr)
            bar.update((args.warmup + args.iters) * len(batches))
            continue
        for b in batches:
            if name.startswith("tensorrt") and b > runner.bundle.max_batch:
                skipped.append({"runtime": f"{name} batch {b}", "reason": f"the engine's profile stops at batch "
                                                                          f"{runner.bundle.max_batch}"})
                bar.update(args.warmup + args.iters)
                continue
            bar.set_description(f"{name} b{b}")
            rows.append(measure(runner, b, pixels, args, flops, preprocess_s[b], manifest, tick))
            bar.set_postfix_str(f"{rows[-1]['images_per_s']:.1f} img/s")
        del runner
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    bar.close()

    base = {r["batch_size"]: r["images_per_s"] for r in rows if r["runtime"] == BASELINE}
    for r in rows:
        r["ratio_to_baseline"] = r["images_per_s"] / base[r["batch_size"]] if r["batch_size"] in base else None
    m = manifest.backbone
    return {
        "benchmark": "throughput", "created": utc_now(), "command": command_line(), "cwd": str(Path.cwd()),
        "machine": machine_info(), "load_average": {"start": load_start, "end": load_average()},
        "versions": library_versions(),
        "settings": {"device": device, "threads": args.threads, "batch_sizes": batches, "iters": args.iters,
                     "warmup": args.warmup, "runtimes": names,
                     "cuda_matmul_tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device == "cuda" else None},
        "bundle": {"path": str(path.resolve()), "model_id": manifest.model_id, "kind": manifest.kind,
                   "model": m.name, "pretrained": m.pretrained, "image_size": cfg.size,
                   "classes": len(manifest.classes.names), "variants": list(manifest.towers["image"].variants),
                   "tower_id": manifest.tower_id, "default_precision": manifest.default_precision,
                   "fingerprint": m.fingerprint, "fingerprint_checked": True},
        "baseline": {"runtime": BASELINE, "what": "open_clip model.encode_image + L2 normalise + logit_scale * "
                                                  "features @ the bundle's zero-shot text table, torch eager fp32 "
                                                  "under inference_mode, same weights (fingerprint checked)"},
        "flops_per_image": flops, "flop_counter": "torch.utils.flop_counter.FlopCounterMode, image tower, batch 1",
        "stages": {"preprocess": "decode JPEG bytes (PIL) + resize/crop/normalise (fvgpt_runtime.preprocess), CPU, "
                                 "the same for every runtime",
                   "model": "host pixels -> host image features (transfers included)",
                   "heads": "Bundle.scores(features) over the bundled label set (routing + the heads graph); "
                            "for torch runtimes the head matmul is inside the model stage"},
        "results": rows, "skipped": skipped, "tuning": tuned_choice(path, manifest, rows),
    }


def tuned_choice(path: Path, manifest: Manifest, rows: list[dict]) -> dict | None:
    """The tower `fvgpt serve` runs on this host (the bundle's tuning profile when it applies here, else the safe
    default) and how it did in this run: its images/s ÷ the fastest bundle runtime's, at the profile's batch size."""
    from fvgpt_runtime.tuning import choose, read_profile

    choice = choose(path, manifest, "auto", None)
    name = f"{choice.runtime}-{choice.precision}"
    profile_batch = (read_profile(path) or {}).get("choice", {}).get("batch_size")
    here = [r for r in rows if r["engine"] in ("onnxruntime", "openvino", "tensorrt")]
    batch = profile_batch if any(r["batch_size"] == profile_batch for r in here) else max(
        (r["batch_size"] for r in here), default=None)
    at = {r["runtime"]: r["images_per_s"] for r in here if r["batch_size"] == batch}
    fastest = max(at, key=at.get, default=None)
    return {"served": name, "reason": choice.reason, "batch_size": batch, "images_per_s": at.get(name),
            "fastest": fastest, "ratio_to_fastest": at[name] / at[fastest] if name in at and fastest else None}


def main(argv: list[str] | None = None) -> int:
    from fvgpt.errors import FVGPTError

    args = build_parser().parse_args(argv)
    if args.iters < 1 or args.warmup < 1:
        print("error: --iters and --warmup must be at least 1", file=sys.stderr)
        return 2
    if args.threads is None:
        args.threads = usable_cores()
    try:
        report = run(args)
    except (BenchError, FVGPTError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "throughput.png"
    b = report["bundle"]
    gpus = report["machine"]["gpus"]
    reason = plot(report["results"], png, f"{b['model']} ({b['kind']}) on {report['machine']['cpu']}"
                  f"{' + ' + gpus[0]['name'] if gpus else ''}, device {report['settings']['device']}, "
                  f"threads {report['settings']['threads']}")
    if reason:
        print(f"plot skipped: {reason}", file=sys.stderr)
    report["plot"] = None if reason else png.name
    report["plot_skipped"] = reason
    json_path, csv_path = write_outputs(out, "throughput", report, report["results"])
    print(markdown_table(report["results"]))
    for s in report["skipped"]:
        print(f"skipped {s['runtime']}: {s['reason']}")
    if t := report["tuning"]:
        ratio = "not measured in this run" if t["ratio_to_fastest"] is None else (
            f"{t['ratio_to_fastest']:.2f}x the fastest bundle runtime here ({t['fastest']}) at batch {t['batch_size']}")
        print(f"fvgpt serve runs {t['served']} on this host ({t['reason']}): {ratio}")
    print(f"wrote {json_path}, {csv_path}" + ("" if reason else f", {png}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
