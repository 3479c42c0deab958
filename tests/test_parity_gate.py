"""The margin-aware parity gate (issue 21.8; export/parity.py, docs/bundle-format.md "The parity gate") on planted
cases: flips between near-tied labels within the variant's measured logit error pass, flips on clear margins fail,
and the KL and cosine bounds still fail real damage that moves no top-1 or hides behind a large error. The expected
figures are computed here from the planted arrays."""
from __future__ import annotations

import numpy as np
import pytest

from fvgpt_export import parity
from fvgpt_export.parity import Limits, compare

N, LABELS = 100, 10
REDUCED = Limits(None, parity.REDUCED_MIN_AGREEMENT)


def decided_logits(seed: int = 0) -> np.ndarray:
    """Reference logits (CLIP scale) whose top-1 leads the runner-up by 2 to 6 on every image."""
    rng = np.random.default_rng(seed)
    logits = rng.uniform(10, 20, (N, LABELS)).astype(np.float32)
    top = rng.integers(0, LABELS, N)
    logits[np.arange(N), top] = logits.max(-1) + rng.uniform(2, 6, N)
    return logits


def with_precision_noise(logits: np.ndarray, scale: float = 0.02, seed: int = 1) -> np.ndarray:
    """What a reduced precision does to logits: a small error on every logit of every image."""
    return (logits + np.random.default_rng(seed).normal(0, scale, logits.shape)).astype(np.float32)


def set_margin(logits: np.ndarray, image: int, margin: float) -> None:
    """The image's top-1 leads its runner-up by exactly `margin`."""
    runner_up = np.sort(logits[image])[-2]
    logits[image, logits[image].argmax()] = runner_up + margin


def flip(candidate: np.ndarray, reference: np.ndarray, image: int, by: float = 0.01) -> None:
    """The candidate answers the reference's runner-up, `by` above the reference's top-1."""
    order = np.argsort(reference[image])
    candidate[image, order[-2]] = candidate[image, order[-1]] + by


def gap_error_quantile(reference: np.ndarray, candidate: np.ndarray) -> float:
    delta = candidate.astype(np.float64) - reference
    return float(np.quantile(delta.max(-1) - delta.min(-1), parity.LOGIT_ERROR_QUANTILE))


def test_near_ties_flipped_within_the_measured_error_pass():
    ref = decided_logits()
    near = [7, 40]
    for i in near:  # two images whose first two labels are tied to 0.01
        set_margin(ref, i, 0.01)
    cand = with_precision_noise(ref)
    for i in near:
        flip(cand, ref, i)  # the precision reorders each tie (a change of about 0.02, within its error)
    epsilon = gap_error_quantile(ref, cand)
    assert 0.01 < epsilon < 2  # the ties are within the error, every other margin far outside it
    report = compare({"logits": ref}, {"logits": cand}, REDUCED)
    assert report["top1_agreement"]["logits"] == 0.98  # the plain agreement would fail the 99 % gate
    flips = report["flips"]["logits"]
    assert report["passed"], report["failures"]
    assert (flips["agreement"], flips["real"], flips["near_ties"]) == (1.0, 0, 2)
    assert flips["logit_error"] == pytest.approx(epsilon)
    assert [f["image"] for f in flips["flipped"]] == near and all(f["near_tie"] for f in flips["flipped"])
    assert all(f["reference_margin"] == pytest.approx(0.01, abs=1e-5) for f in flips["flipped"])


def test_flips_on_clear_margins_fail():
    ref = decided_logits()
    cand = with_precision_noise(ref)
    wrong = [3, 50]
    for i in wrong:  # a real error: the answer changes where the reference decided by 2 or more
        flip(cand, ref, i)
    report = compare({"logits": ref}, {"logits": cand}, REDUCED)
    flips = report["flips"]["logits"]
    assert (flips["agreement"], flips["real"], flips["near_ties"]) == (0.98, 2, 0)
    margins = [float(np.sort(ref[i])[-1] - np.sort(ref[i])[-2]) for i in wrong]
    assert [f["reference_margin"] for f in flips["flipped"]] == pytest.approx(margins, abs=1e-5)
    assert min(margins) >= 2 > flips["logit_error"]  # two damaged images do not raise the error they are judged by
    assert not report["passed"]
    assert any("top-1 agreement 98.00% < 99%" in f and "2 real flips, 0 near-ties" in f for f in report["failures"])


def test_one_real_flip_on_a_moderate_margin_is_within_the_one_percent_budget():
    ref = decided_logits()
    set_margin(ref, 10, 0.5)  # above the error (about 0.1), so real, but a small change of the probabilities
    cand = with_precision_noise(ref)
    flip(cand, ref, 10)
    report = compare({"logits": ref}, {"logits": cand}, REDUCED)
    assert report["flips"]["logits"]["real"] == 1 and report["passed"], report["failures"]
    p, q = (np.exp(x - x.max(-1, keepdims=True)) for x in (ref.astype(np.float64), cand.astype(np.float64)))
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    assert report["mean_kl"]["logits"] == pytest.approx(float((p * np.log(p / q)).sum(-1).mean()), rel=1e-6)
    assert report["mean_kl"]["logits"] < parity.MAX_MEAN_KL


def test_damage_that_moves_no_top1_or_hides_behind_a_large_error_fails_on_kl():
    ref = decided_logits()
    flattened = (ref * 0.5).astype(np.float32)  # same answers, probabilities far from the reference's
    report = compare({"logits": ref}, {"logits": flattened}, REDUCED)
    assert report["top1_agreement"]["logits"] == 1.0 and report["flips"]["logits"]["real"] == 0
    assert not report["passed"] and any("mean KL" in f for f in report["failures"])
    noisy = with_precision_noise(ref, scale=3.0)  # an error so large that every flip sits within it
    report = compare({"logits": ref}, {"logits": noisy}, REDUCED)
    flips = report["flips"]["logits"]
    assert flips["near_ties"] > 5 and flips["real"] == 0  # the margin rule alone would let this through ...
    assert report["mean_kl"]["logits"] > parity.MAX_MEAN_KL and not report["passed"]  # ... the KL bound does not


def test_reduced_precision_features_have_a_cosine_backstop():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(N, 64)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    close = ref + rng.normal(0, 0.005, ref.shape).astype(np.float32)
    limits = Limits(None, None, parity.REDUCED_MIN_COSINE)
    assert compare({"features": ref}, {"features": close}, limits)["passed"]
    broken = close.copy()
    broken[17] = rng.normal(size=64)  # one image's features from a broken graph
    report = compare({"features": ref}, {"features": broken}, limits)
    cosine = float(broken[17] @ ref[17] / np.linalg.norm(broken[17]))
    assert report["min_cosine"] == pytest.approx(cosine, abs=1e-6) and not report["passed"]
    assert "features min cosine" in report["failures"][0]
