"""`fvgpt tune BUNDLE`: measure every runtime × precision of the bundle's tower that runs on this host and passes the
parity gate here, at the batch sizes the server may form, and write the tuning profile `fvgpt serve` uses
(fvgpt_runtime.tuning; docs/bundle-format.md, "Tuning profile").

Candidates: ONNX Runtime on the CPU (every ONNX precision but fp16, a GPU precision) and, where onnxruntime-gpu sees a
GPU, on CUDA; the bundle's TensorRT engines where TensorRT runs; its OpenVINO variants where OpenVINO is installed
(bf16 only on CPUs with bf16 instructions). torch.compile is never a candidate: the server is torch-free. Each one
left out is recorded with the reason.

Each candidate first re-runs the parity gate on this host (tower, end to end, batch independence, against the
reference the export stored), because kernels and precision support differ between CPUs. The timing then goes round
robin (fvgpt_runtime.host.round_robin) so load from other processes hits all candidates alike. The choice
(fvgpt_runtime.tuning.select) weighs images/s in the largest batch measured (the batch a loaded server forms) against
accuracy, the measured logit error of the parity gate: the fastest candidate that is at least 1.15x as fast as every
more accurate one (--prefer speed: the fastest; --prefer accuracy: the fastest of the most accurate).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.host import host_facts, latency_summary, load_average, round_robin, usable_cores
from fvgpt_runtime.manifest import BundleError, Manifest
from fvgpt_runtime.tuning import ACCURACY_FACTOR, EXACT_LOGIT_ERROR, PROFILE_SCHEMA, SPEED_MARGIN, select, write_profile

from .parity import check_variant, parity_pixels

DEFAULT_BATCH_SIZES = (1, 2, 4, 8)  # `fvgpt serve`'s adaptive batcher forms 1..--max-batch-size (default 8)
NOT_SERVABLE = {"torch.compile": "not a serving runtime: the server and the bundle runtime are torch-free "
                                 "(benchmarks/throughput.py measures compile-* beside the bundle)"}


@dataclass(frozen=True)
class Candidate:
    runtime: str
    precision: str
    device: str  # "cpu" or "cuda"

    @property
    def name(self) -> str:
        cuda = self.runtime == "onnx" and self.device == "cuda"
        return f"{self.runtime}-{self.precision}" + ("-cuda" if cuda else "")


def candidates(manifest: Manifest) -> tuple[list[Candidate], dict[str, str]]:
    """The runtime × precision × device candidates this host can run for this bundle, and why others are left out."""
    tower = manifest.towers["image"]
    found, skipped = [], dict(NOT_SERVABLE)
    for precision in tower.precisions("onnx"):
        if precision == "fp16":
            skipped["onnx-fp16"] = "fp16 is a GPU precision (ONNX Runtime's CPU provider has few fp16 kernels)"
        else:
            found.append(Candidate("onnx", precision, "cpu"))
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        found += [Candidate("onnx", p, "cuda") for p in tower.precisions("onnx")]
    else:
        skipped["onnx-cuda"] = "onnxruntime has no CUDAExecutionProvider here (onnxruntime-gpu and a GPU needed)"
    if engines := list((manifest.tensorrt or {}).get("image", {})):
        from fvgpt_runtime.tensorrt import tensorrt_unusable

        if reason := tensorrt_unusable():
            skipped["tensorrt"] = reason
        else:
            found += [Candidate("tensorrt", p, "cuda") for p in engines]
    else:
        skipped["tensorrt"] = "the bundle has no TensorRT engine (export with --tensorrt on a GPU host)"
    from fvgpt_runtime.openvino import OpenVINOUnavailable, unsupported

    try:
        for precision in tower.precisions("openvino"):
            if reason := unsupported(precision):
                skipped[f"openvino-{precision}"] = reason
            else:
                found.append(Candidate("openvino", precision, "cpu"))
        if not tower.precisions("openvino"):
            skipped["openvino"] = "the bundle has no OpenVINO variants (export with --openvino)"
    except OpenVINOUnavailable as exc:
        skipped["openvino"] = str(exc)
    return found, skipped


def _gate_summary(checks: dict[str, dict]) -> dict:
    """One candidate's parity figures on this host: the worst of its outputs' (export/parity.py). `logit_error`, the
    measured logit error, is what the choice ranks accuracy by (fvgpt_runtime.tuning.select)."""
    agreement = [v for c in checks.values() for v in c.get("top1_agreement", {}).values()]
    flips = [f for c in checks.values() for f in c.get("flips", {}).values()]
    return {"passed": all(c["passed"] for c in checks.values()),
            "top1_agreement": min(agreement) if agreement else None,
            "margin_aware_agreement": min(f["agreement"] for f in flips),
            "near_ties": sum(f["near_ties"] for f in flips), "logit_error": max(f["logit_error"] for f in flips),
            "mean_kl": max(v for c in checks.values() for v in c.get("mean_kl", {}).values()),
            "min_cosine": min((c["min_cosine"] for c in checks.values() if "min_cosine" in c), default=None),
            "batch_max_probability_diff": max(v for c in checks.values()
                                              for v in c.get("max_probability_diff", {}).values()),
            "failures": [f for c in checks.values() for f in c["failures"]]}


class _Progress:
    """A bar on a terminal; in a log, one plain line per step."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.bar = tqdm(total=total, desc="tune", unit="call", file=sys.stderr, dynamic_ncols=True,
                        disable=not self.tty)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def say(self, msg: str) -> None:
        if self.tty:
            self.bar.write(msg, file=sys.stderr)
        elif self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def tune(bundle_dir: str | Path, batch_sizes: list[int] | None = None, threads: int | None = None, iters: int = 10,
         warmup: int = 2, precisions: list[str] | None = None, runtimes: list[str] | None = None,
         progress: bool = True, prefer: str = "balanced") -> dict:
    """Gate and time every candidate here (or those of the given precisions and runtimes), choose, write the profile
    into the bundle dir; returns the profile."""
    path = Path(bundle_dir)
    bundle = Bundle(path, threads=1)  # verifies every file; the heads are not what is tuned
    manifest = bundle.manifest
    batches = sorted(set(batch_sizes or DEFAULT_BATCH_SIZES))
    if batches[-1] > manifest.max_batch:
        raise BundleError(f"batch size {batches[-1]} is over the bundle's max batch {manifest.max_batch}")
    threads = threads or usable_cores()
    found, skipped = candidates(manifest)
    for option, wanted, field in (("--precisions", precisions, "precision"), ("--runtimes", runtimes, "runtime")):
        if wanted:
            skipped |= {c.name: f"left out by {option} {','.join(wanted)}" for c in found
                        if getattr(c, field) not in wanted}
            found = [c for c in found if getattr(c, field) in wanted]
    load_start = load_average()
    parity = manifest.parity
    reference = load_file(str(path / parity["reference"]))
    pixels = parity_pixels(manifest.preprocess, parity["generated_images"])
    bar = _Progress(len(found) * len(batches) * (warmup + iters), progress)
    towers, gates = {}, {}
    for c in found:
        bar.say(f"{c.name}: parity gate on this host ({len(pixels)} images)")
        try:
            summary = _gate_summary(check_variant(bundle, c.runtime, c.precision, pixels, reference, c.device))
            tower = bundle.towers(c.precision, c.runtime, c.device, threads)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here is reported, the others go on
            skipped[c.name] = f"failed to run here: {type(exc).__name__}: {exc}"
        else:
            if summary["passed"]:
                towers[c], gates[c] = tower, summary
            else:
                skipped[c.name] = "fails the parity gate on this host: " + "; ".join(summary["failures"])
        if c not in towers:
            bar.say(f"{c.name}: left out ({skipped[c.name]})")
            bar.step(len(batches) * (warmup + iters))
    if not towers:
        bar.close()
        raise BundleError("no candidate runs here and passes the parity gate: " +
                          "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    times: dict[Candidate, dict[int, list[float]]] = {c: {} for c in towers}
    for b in batches:
        x = np.ascontiguousarray(np.resize(pixels, (b, *pixels.shape[1:])))
        for c, t in round_robin(towers, x, warmup, iters, bar.step).items():
            times[c][b] = t
        bar.say(f"batch {b}: " + ", ".join(f"{c.name} {b * iters / sum(times[c][b]):.1f}" for c in towers)
                + " images/s")
    bar.close()
    rows = {c: [{"batch_size": b, "images_per_s": b * len(t) / sum(t), **latency_summary(t)}
                for b, t in times[c].items()] for c in towers}
    measured = [{"name": c.name, "runtime": c.runtime, "precision": c.precision, "device": c.device,
                 "tower_id": manifest.variant_id(c.runtime, c.precision), "provider": towers[c].provider,
                 "gate": gates[c], "results": rows[c]} for c in towers]
    measured.sort(key=lambda m: m["results"][-1]["images_per_s"], reverse=True)
    best, why = select(measured, batches[-1], prefer)
    default = next((m for m in measured if (m["runtime"], m["precision"], m["device"]) ==
                    ("onnx", manifest.default_precision, "cpu")), None)
    if default is not None and default is not best:
        why += (f"; {best['results'][-1]['images_per_s'] / default['results'][-1]['images_per_s']:.2f}x the safe "
                f"default ({default['name']})")
    profile = {
        "schema": PROFILE_SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_id": manifest.model_id, "host": host_facts(),
        "settings": {"threads": threads, "batch_sizes": batches, "iters": iters, "warmup": warmup,
                     "order": "round robin: per round, of every candidate one untimed call, then one timed call"},
        "load_average": {"start": load_start, "end": load_average()},
        "candidates": measured, "skipped": skipped,
        "choice": {k: best[k] for k in ("name", "runtime", "precision", "device")} | {
            "batch_size": batches[-1], "images_per_s": best["results"][-1]["images_per_s"], "prefer": prefer,
            "rule": {"speed_margin": SPEED_MARGIN[prefer], "accuracy_factor": ACCURACY_FACTOR,
                     "exact_logit_error": EXACT_LOGIT_ERROR}, "why": why},
    }
    write_profile(path, profile)
    return profile


def format_profile(profile: dict) -> str:
    """The tuned table for a terminal or a closing note."""
    host = profile["host"]
    lines = [(f"host: {host['cpu']} (family {host['cpu_family']}, model {host['cpu_model']}), "
              f"{host['cores_usable']} cores, flags {' '.join(host['cpu_flags'])}; threads "
              f"{profile['settings']['threads']}; load average {profile['load_average']['start']}"),
             ("| candidate | provider | batch | images/s | p50 ms | p95 ms | logit error | top-1 agreement (near-ties) "
              "| mean KL | cosine >= | batch max |Δp| |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in profile["candidates"]:
        g = c["gate"]
        cosine = "—" if g["min_cosine"] is None else f"{g['min_cosine']:.6f}"
        for r in c["results"]:
            lines.append(f"| {c['name']} | {c['provider']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
                         f"{r['latency_ms_p50']:.1f} | {r['latency_ms_p95']:.1f} | {g['logit_error']:.3g} | "
                         f"{g['margin_aware_agreement']:.1%} ({g['near_ties']}) | {g['mean_kl']:.2g} | {cosine} | "
                         f"{g['batch_max_probability_diff']:.1e} |")
    lines += [f"left out {k}: {v}" for k, v in profile["skipped"].items()]
    lines.append(f"choice: {profile['choice']['name']} — {profile['choice']['why']}")
    return "\n".join(lines)
