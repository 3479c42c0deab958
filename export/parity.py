"""The parity gate: a bundle's graphs against the torch model on a fixed, deterministic image set.

The set is generated shape images (fvgpt.demo_data, fixed seed) plus the real CC0 photos shipped in fvgpt/assets,
preprocessed by the runtime's own NumPy pipeline, so torch and the bundle see the same tensor and the gate measures
the graphs and nothing else (preprocessing is pinned to open_clip by tests/test_preprocess.py). The torch outputs are
stored in the bundle, so `fvgpt validate` reruns every check below without torch.

Checks: the tower per runtime × precision (features), the heads (logits from the reference features), the text graph
(against the tables), end to end through the runtime's routing (tower → heads, base and new label sets), and batch
independence per tower variant (the same image alone and inside a full batch of other images: identical ranking,
probabilities within 1e-5), because a served answer must never depend on its batch mates.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fvgpt.demo_data import DEFAULT_CLASSES, render
from fvgpt.errors import FVGPTError
from fvgpt.photos import photo_paths
from fvgpt.preprocess import Preprocess
from fvgpt_runtime.bundle import Bundle, softmax
from fvgpt_runtime.preprocess import preprocess

PARITY_SEED = 20260309
CALIBRATION_SEED = 20260310  # int8 calibration images: drawn like the parity set, never the same images
PARITY_REFERENCE = "parity_reference.safetensors"
FP32_MAX_ABS = 1e-3  # logits (scale 100) of fp32 graphs against torch
FEATURES_MAX_ABS = 1e-4  # unit-norm image features of the fp32 tower against torch
TEXT_MAX_ABS = 1e-4
FP32_MIN_AGREEMENT = 1.0
REDUCED_MIN_AGREEMENT = 0.99  # of images without a real flip (margin-aware, below)
LOGIT_ERROR_QUANTILE = 0.95  # the variant's measured logit error: this quantile over images of the gap error
MAX_MEAN_KL = 0.01  # nats: mean KL(p_reference ‖ p_variant) of the served probabilities, every logits output
REDUCED_MIN_COSINE = 0.95  # reduced-precision tower features, every image: a backstop against a broken graph
BATCH_PROBABILITY_TOLERANCE = 1e-5
EXPLAIN_MAX_ABS = 1e-4  # fp32 explain maps (units of a cosine) against torch
EXPLAIN_MIN_CORRELATION = 0.95  # reduced-precision explain maps: per-image correlation with torch's
FULL_BATCH = 16  # the batch the probes are placed in (at most the bundle's max batch)
BATCH_PROBES = 4


class ParityError(FVGPTError):
    pass


@dataclass(frozen=True)
class Limits:
    max_abs: float | None  # None: not gated on absolute difference (reduced precision)
    min_agreement: float | None  # None: no top-1 (features)
    min_cosine: float | None = None  # features: None, not gated (fp32 is gated on max |Δ|)


def parity_pixels(pre: Preprocess, n_generated: int) -> np.ndarray:
    """The parity set: `n_generated` rendered images, then the bundled photos."""
    from PIL import Image

    return _rendered(pre, n_generated, PARITY_SEED, [Image.open(p) for p in photo_paths()])


def calibration_pixels(pre: Preprocess, n: int) -> np.ndarray:
    """Images to calibrate static int8 scales on: rendered like the parity set, from another seed (no photos, which
    are in the parity set)."""
    return _rendered(pre, n, CALIBRATION_SEED, [])


def _rendered(pre: Preprocess, n: int, seed: int, extra: list) -> np.ndarray:
    rng = random.Random(seed)
    images = [render(rng.choice(DEFAULT_CLASSES), rng, 160)[0] for _ in range(n)] + extra
    return np.stack([preprocess(im, pre) for im in images])


def run_in_batches(fn: Callable[[np.ndarray], dict[str, np.ndarray]], pixels: np.ndarray,
                   batch: int = 16) -> dict[str, np.ndarray]:
    parts = [fn(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], limits: Limits) -> dict:
    """Max |Δ| per output; for features the min cosine, for logits the margin-aware top-1 agreement (`flips`) and the
    mean KL of the probabilities; pass/fail against `limits`."""
    report: dict = {"max_abs_diff": {}, "top1_agreement": {}, "limits": {
        "max_abs": limits.max_abs, "min_agreement": limits.min_agreement, "min_cosine": limits.min_cosine,
        "max_mean_kl": MAX_MEAN_KL, "logit_error_quantile": LOGIT_ERROR_QUANTILE}}
    failures = []
    for name, cand in candidate.items():
        ref, cand = reference[name], cand.astype(np.float32)
        diff = float(np.abs(cand - ref).max())
        report["max_abs_diff"][name] = diff
        if name.endswith("features"):  # features, clip_features: every image's (and every kind's) vector
            cos = (cand * ref).sum(-1) / (np.linalg.norm(cand, axis=-1) * np.linalg.norm(ref, axis=-1))
            report["min_cosine"] = min(float(cos.min()), report.get("min_cosine", 1.0))
            if limits.min_cosine is not None and cos.min() < limits.min_cosine:
                failures.append(f"features min cosine {cos.min():.6f} < {limits.min_cosine:g}")
        else:
            report["top1_agreement"][name] = float((cand.argmax(-1) == ref.argmax(-1)).mean())
            f = report.setdefault("flips", {})[name] = flips(ref, cand)
            kl = report.setdefault("mean_kl", {})[name] = mean_kl(ref, cand)
            agree = f["agreement"]
            if limits.min_agreement is not None and agree < limits.min_agreement:
                failures.append(f"{name} top-1 agreement {agree:.2%} < {limits.min_agreement:.0%}, counting only "
                                f"flips on reference margins above the logit error {f['logit_error']:.3g} "
                                f"({f['real']} real flips, {f['near_ties']} near-ties)")
            if kl > MAX_MEAN_KL:
                failures.append(f"{name} mean KL(reference ‖ variant) {kl:.3g} > {MAX_MEAN_KL:g}")
        if limits.max_abs is not None and diff > limits.max_abs:
            failures.append(f"{name} max |Δ| {diff:.3g} > {limits.max_abs:g}")
    report["passed"], report["failures"] = not failures, failures
    return report


def flips(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Margin-aware top-1 agreement of one logits output (docs/bundle-format.md, "The parity gate").

    Per image, the gap error is the largest change of a difference between two of its logits, max(Δ) − min(Δ) with
    Δ = candidate − reference: only a change of a difference can reorder two labels. The variant's measured logit
    error ε is the LOGIT_ERROR_QUANTILE quantile of the gap errors over the images. A flip (the top-1 changed from a
    to b) whose reference margin logit_a − logit_b is at most ε is a near-tie: the precision's own error, seen on most
    images, can reorder it. A flip on a larger margin is real, and only real flips count against the agreement.
    """
    delta = candidate.astype(np.float64) - reference
    gap_error = delta.max(-1) - delta.min(-1)
    epsilon = float(np.quantile(gap_error, LOGIT_ERROR_QUANTILE))
    ref_top, cand_top = reference.argmax(-1), candidate.argmax(-1)
    rows = np.arange(len(reference))
    margin = reference[rows, ref_top] - reference[rows, cand_top]
    top2 = np.sort(reference, axis=-1)[:, -2:]
    decided = top2[:, -1] - top2[:, 0]  # every image's reference margin between its first two labels (0: one label)
    flipped = np.flatnonzero(ref_top != cand_top)
    records = [{"image": int(i), "reference_margin": float(margin[i]), "gap_error": float(gap_error[i]),
                "near_tie": bool(margin[i] <= epsilon)} for i in flipped]
    real = sum(not r["near_tie"] for r in records)
    return {"agreement": 1 - real / len(reference), "real": real, "near_ties": len(records) - real,
            "logit_error": epsilon, "flipped": records,
            "reference_margins": {"min": float(decided.min()), "p05": float(np.quantile(decided, 0.05)),
                                  "median": float(np.median(decided))}}


def mean_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over images of KL(softmax(reference) ‖ softmax(candidate)) in nats: the served probabilities' change."""
    log_p = _log_softmax(reference.astype(np.float64))
    log_q = _log_softmax(candidate.astype(np.float64))
    return float(max(0.0, (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _strict(precision: str, runtime: str) -> bool:
    return precision == "fp32" and runtime in ("onnx", "openvino")


def check_tower(bundle: Bundle, precision: str, runtime: str, pixels: np.ndarray,
                reference: dict[str, np.ndarray], device: str = "cpu") -> dict:
    """Features of the tower graphs (every role the heads read, under the heads' input names): fp32 gated on max |Δ|,
    reduced precision on the min cosine (a backstop; the answers are judged end to end)."""
    towers = bundle.towers(precision, runtime, device)
    out = run_in_batches(lambda x: _by_input(bundle, towers(x)), pixels)
    strict = _strict(precision, runtime)
    return compare(reference, out, Limits(FEATURES_MAX_ABS if strict else None, None,
                                          None if strict else REDUCED_MIN_COSINE))


def check_heads(bundle: Bundle, reference: dict[str, np.ndarray]) -> dict:
    """The heads graph from the reference features, through the runtime's routing, against the torch heads."""
    features = {role: reference[name] for name, role in bundle.manifest.heads.features.items()}
    return compare(reference, _routed(bundle, features), Limits(FP32_MAX_ABS, FP32_MIN_AGREEMENT))


def check_end_to_end(bundle: Bundle, precision: str, runtime: str, pixels: np.ndarray,
                     reference: dict[str, np.ndarray], device: str = "cpu") -> dict:
    """pixels → towers → routed heads, against the torch model's logits."""
    towers = bundle.towers(precision, runtime, device)
    out = run_in_batches(lambda x: _routed(bundle, towers(x)), pixels)
    strict = _strict(precision, runtime)
    return compare(reference, out, Limits(FP32_MAX_ABS if strict else None,
                                          FP32_MIN_AGREEMENT if strict else REDUCED_MIN_AGREEMENT))


def check_batch_independence(bundle: Bundle, precision: str, runtime: str, pixels: np.ndarray,
                             device: str = "cpu") -> dict:
    """Probes at spread positions of a full batch of parity images, each also run alone: through the tower and the
    routed heads, the ranking of every label must be identical and every probability within the tolerance."""
    tower = bundle.towers(precision, runtime, device)
    full = min(FULL_BATCH, bundle.max_batch, len(pixels))
    batch = pixels[:full]
    probes = sorted(set(np.linspace(0, full - 1, min(BATCH_PROBES, full)).round().astype(int).tolist()))
    together = _routed(bundle, tower(batch))
    alone = [_routed(bundle, tower(batch[i:i + 1])) for i in probes]
    report: dict = {"batch": full, "probes": probes, "max_probability_diff": {}, "ranking_identical": {},
                    "limits": {"max_probability_diff": BATCH_PROBABILITY_TOLERANCE}}
    failures = []
    for name, logits in together.items():
        in_batch = softmax(logits[probes])
        single = softmax(np.concatenate([a[name] for a in alone]))
        diff = float(np.abs(in_batch - single).max())
        same = bool((np.argsort(-in_batch, axis=-1, kind="stable") == np.argsort(-single, axis=-1,
                                                                                   kind="stable")).all())
        report["max_probability_diff"][name], report["ranking_identical"][name] = diff, same
        if diff > BATCH_PROBABILITY_TOLERANCE:
            failures.append(f"{name} probabilities alone vs in a batch of {full} differ by {diff:.3g} > "
                            f"{BATCH_PROBABILITY_TOLERANCE:g}")
        if not same:
            failures.append(f"{name} ranking alone differs from the ranking in a batch of {full}")
    report["passed"], report["failures"] = not failures, failures
    return report


def check_text(bundle: Bundle) -> dict:
    """The text graph must reproduce the tables for every bundled class."""
    learned, clip = bundle.encode_text(list(bundle.classes.names))
    diff = float(max(np.abs(learned - bundle.tables["learned"]).max(), np.abs(clip - bundle.tables["clip"]).max()))
    failures = [] if diff <= TEXT_MAX_ABS else [f"text features max |Δ| {diff:.3g} > {TEXT_MAX_ABS:g}"]
    return {"labels": len(bundle.classes.names), "max_abs_diff": {"text_features": diff},
            "limits": {"max_abs": TEXT_MAX_ABS}, "passed": not failures, "failures": failures}


def _by_input(bundle: Bundle, by_role: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tower outputs by role → by the heads graph's input names (the reference's names for them)."""
    return {name: by_role[role] for name, role in bundle.manifest.heads.features.items()}


def _routed(bundle: Bundle, features: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The outputs the reference holds, each reached the way a client reaches it: the base classes route to the base
    head, the full class list (when some are new) to the new head; zero-shot bundles have one head."""
    if bundle.kind != "fvgpt":
        return {"logits": bundle.scores(features).logits}
    out = {"base_logits": bundle.scores(features, bundle.classes.base_names).logits}
    if bundle.classes.new_ids:
        out["new_logits"] = bundle.scores(features).logits
    return out


def check_name(runtime: str, precision: str) -> str:
    """The suffix of a variant's checks in a parity report: "int8" (ONNX Runtime), "openvino_int8", ..."""
    return precision if runtime == "onnx" else f"{runtime}_{precision}"


def check_variant(bundle: Bundle, runtime: str, precision: str, pixels: np.ndarray,
                  reference: dict[str, np.ndarray], device: str = "cpu") -> dict[str, dict]:
    """The tower, end-to-end and batch-independence checks of one runtime × precision, keyed by name."""
    name = check_name(runtime, precision)
    return {f"tower_{name}": check_tower(bundle, precision, runtime, pixels, reference, device),
            f"end_to_end_{name}": check_end_to_end(bundle, precision, runtime, pixels, reference, device),
            f"batch_independence_{name}": check_batch_independence(bundle, precision, runtime, pixels, device)}


def check_bundle(bundle_dir: Path, pixels: np.ndarray, reference: dict[str, np.ndarray],
                 engines: dict[str, list[str]]) -> dict[str, dict]:
    """Every check for the given runtimes → precisions (e.g. {"onnx": ["fp32", "int8"]}), keyed by name."""
    bundle = Bundle(bundle_dir, verify=False)
    reports = {"heads": check_heads(bundle, reference), "text": check_text(bundle)}
    for runtime, precisions in engines.items():
        for precision in precisions:
            reports |= check_variant(bundle, runtime, precision, pixels, reference)
    return reports


def explain_reference(graph: Callable, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The torch explain graph's map of every parity image along its own feature (B, P): a class-agnostic summary of
    patch_contrib small enough to store in the parity reference, so `fvgpt validate` can recheck it without torch."""
    import torch

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            features, contrib = graph(torch.from_numpy(x))
        return {"explain_map": explain_map(features.numpy(), contrib.numpy())}

    return run_in_batches(run, pixels)


def explain_map(features: np.ndarray, contrib: np.ndarray) -> np.ndarray:
    return np.einsum("bpd,bd->bp", contrib.astype(np.float64), features.astype(np.float64)).astype(np.float32)


def check_explain(bundle: Bundle, precision: str, pixels: np.ndarray, reference: dict[str, np.ndarray]) -> dict:
    """An explain graph against torch: its features as the tower's (fp32: max |Δ| ≤ 1e-4; reduced: min cosine), and
    its maps along the reference features — fp32: max |Δ| ≤ EXPLAIN_MAX_ABS; reduced precision: every image's map
    correlates ≥ EXPLAIN_MIN_CORRELATION with torch's (a map is read for where it is high, not for its exact values)."""
    run = bundle.explainer(precision)
    out = run_in_batches(lambda x: dict(zip(("features", "contrib"), run(x))), pixels)
    strict = precision == "fp32"
    report = compare(reference, {"features": out["features"]},
                     Limits(FEATURES_MAX_ABS if strict else None, None, None if strict else REDUCED_MIN_COSINE))
    maps, ref = explain_map(reference["features"], out["contrib"]), reference["explain_map"]
    diff = float(np.abs(maps - ref).max())
    a, b = maps - maps.mean(-1, keepdims=True), ref - ref.mean(-1, keepdims=True)
    corr = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    report["max_abs_diff"]["explain_map"], report["min_map_correlation"] = diff, float(corr.min())
    report["limits"] |= {"map_max_abs": EXPLAIN_MAX_ABS if strict else None,
                         "min_map_correlation": None if strict else EXPLAIN_MIN_CORRELATION}
    if strict and diff > EXPLAIN_MAX_ABS:
        report["failures"].append(f"explain_map max |Δ| {diff:.3g} > {EXPLAIN_MAX_ABS:g}")
    if not strict and corr.min() < EXPLAIN_MIN_CORRELATION:
        report["failures"].append(f"explain_map min correlation {corr.min():.4f} < {EXPLAIN_MIN_CORRELATION:g}")
    report["passed"] = not report["failures"]
    return report


def gate(reports: dict[str, dict]) -> None:
    """Raise, naming every failing check, unless all passed."""
    failed = [f"{name}: {'; '.join(r['failures'])}" for name, r in reports.items() if not r["passed"]]
    if failed:
        raise ParityError("parity gate failed — " + " | ".join(failed) + " — no bundle was written")
