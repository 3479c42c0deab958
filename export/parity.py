"""The parity gate: bundle graphs against the torch model on a fixed, deterministic image set.

The set is generated shape images (fvgpt.demo_data, fixed seed) plus the real CC0 photos shipped in fvgpt/assets,
preprocessed once with open_clip's own transform; torch and the bundle see the same tensor, so the gate measures
the graph and nothing else (preprocessing has its own test).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fvgpt.errors import FVGPTError
from fvgpt.demo_data import DEFAULT_CLASSES, render
from fvgpt.photos import photo_paths

PARITY_SEED = 20260309
FP32_MAX_ABS = 1e-3
FP32_MIN_AGREEMENT = 1.0
REDUCED_MIN_AGREEMENT = 0.99
TEXT_MAX_ABS = 1e-4


class ParityError(FVGPTError):
    pass


def generated_images(n: int, seed: int, size: int = 160) -> list:
    rng = random.Random(seed)
    return [render(rng.choice(DEFAULT_CLASSES), rng, size)[0] for _ in range(n)]


def parity_set(eval_transform: Callable, n_generated: int = 96) -> np.ndarray:
    from PIL import Image

    images = generated_images(n_generated, PARITY_SEED) + [Image.open(p).convert("RGB") for p in photo_paths()]
    return torch.stack([eval_transform(im) for im in images]).numpy()


@dataclass(frozen=True)
class Limits:
    max_abs: float | None  # None: not gated on absolute difference (reduced precision)
    min_agreement: float


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], limits: Limits) -> dict:
    """Max |Δ| per output and top-1 agreement per logits output, with pass/fail against `limits`."""
    report = {"max_abs_diff": {}, "top1_agreement": {}, "limits": {"max_abs": limits.max_abs,
                                                                  "min_agreement": limits.min_agreement}}
    for name, ref in reference.items():
        cand = candidate[name].astype(np.float32)
        report["max_abs_diff"][name] = float(np.abs(cand - ref).max())
        if name != "features":
            report["top1_agreement"][name] = float((cand.argmax(-1) == ref.argmax(-1)).mean())
    failures = [f"{k} top-1 agreement {v:.2%} < {limits.min_agreement:.0%}"
                for k, v in report["top1_agreement"].items() if v < limits.min_agreement]
    if limits.max_abs is not None:
        failures += [f"{k} max |Δ| {v:.3g} > {limits.max_abs:g}"
                     for k, v in report["max_abs_diff"].items() if k != "features" and v > limits.max_abs]
    report["passed"] = not failures
    report["failures"] = failures
    return report


def run_in_batches(fn: Callable[[np.ndarray], dict[str, np.ndarray]], pixels: np.ndarray,
                   batch: int = 16) -> dict[str, np.ndarray]:
    parts = [fn(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def parity_transform(preprocess: dict) -> Callable:
    """open_clip's evaluation transform rebuilt from a manifest's preprocessing block (what export used)."""
    import open_clip

    return open_clip.image_transform(preprocess["size"], is_train=False, mean=preprocess["mean"],
                                     std=preprocess["std"], resize_mode=preprocess["resize_mode"],
                                     interpolation=preprocess["interpolation"])


def check_image_graph(bundle_dir, precision: str, runtime: str, pixels: np.ndarray,
                      reference: dict[str, np.ndarray]) -> dict:
    """The bundle's image graph (as served) against the reference outputs. fp32 ONNX must match to 1e-3 with
    100 % top-1 agreement; reduced precision and TensorRT must agree on top-1 for ≥ 99 % of images."""
    from .bundle import Bundle

    bundle = Bundle(bundle_dir, precision=precision, runtime=runtime, device="cpu", verify=False)
    strict = precision == "fp32" and runtime == "onnx"
    limits = Limits(FP32_MAX_ABS, FP32_MIN_AGREEMENT) if strict else Limits(None, REDUCED_MIN_AGREEMENT)
    return compare(reference, run_in_batches(bundle.run_image, pixels), limits)


def check_text_and_head(bundle_dir, reference: dict[str, np.ndarray]) -> dict:
    """The text graph must reproduce the precomputed tables for every bundled class (max |Δ| ≤ 1e-4), and the head
    graph must reproduce the image graph's label-set logits from the reference features."""
    from .bundle import Bundle

    bundle = Bundle(bundle_dir, precision="fp32", device="cpu", verify=False)
    tuned, clip = bundle.encode_text(bundle.classes)
    diff = float(max(np.abs(tuned - bundle.tables["tuned"]).max(), np.abs(clip - bundle.tables["clip"]).max()))
    text = {"labels": len(bundle.classes), "max_abs_diff": diff, "limits": {"max_abs": TEXT_MAX_ABS},
            "passed": diff <= TEXT_MAX_ABS,
            "failures": [] if diff <= TEXT_MAX_ABS else [f"text features max |Δ| {diff:.3g} > {TEXT_MAX_ABS:g}"]}
    key = "new_logits" if bundle.kind == "fvgpt" else "logits"
    logits = bundle.run_head(reference["features"], bundle.tables["tuned"], bundle.tables["clip"])
    head = compare({key: reference[key]}, {key: logits}, Limits(FP32_MAX_ABS, FP32_MIN_AGREEMENT))
    return {"text": text, "head": head}
