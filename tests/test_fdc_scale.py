"""`python -m benchmarks.fdc_scale --quick`: the FDC scale measurement runs every S it is given, applies its stated
rule, and its calibrated-scale statistic is the NLL minimiser."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks.fdc_scale import main, nll_optimal_scale


def test_nll_optimal_scale_is_the_calibrating_temperature():
    """Two classes, cosines (c, −c), the first class right for a fraction q: NLL(t) is smallest where
    σ(2tc) = q, i.e. t = logit(q) / 2c (on the script's log grid, within a step)."""
    c, q = 0.1, 0.9
    cosines = np.tile([c, -c], (100, 1))
    targets = np.array([0] * 90 + [1] * 10)
    want = math.log(q / (1 - q)) / (2 * c)
    assert nll_optimal_scale(cosines, targets) == pytest.approx(want, rel=0.02)


def test_fdc_scale_quick_run(tmp_path):
    assert main(["--quick", "--seeds", "1,2", "--scales", "100,40", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "fdc_scale.json").read_text())
    assert set(doc["summary"]) == {"s", "100", "40"}
    for seed in ("1", "2"):
        scales = doc["per_seed"][seed]["scales"]
        assert scales["100"]["S"] == 100.0 and scales["40"]["S"] == 40.0
        assert scales["s"]["S"] == pytest.approx(16.3, abs=0.1)  # the micro-CLIP's own logit scale
        assert scales["s"]["test"]["coop"] == scales["100"]["test"]["coop"]  # one stage 1 for every S
    choice = doc["choice"]
    others = {k: v["validation_base"] for k, v in doc["summary"].items() if k != "s"}
    assert choice["best_other"] == max(others, key=others.get)
    assert choice["S"] == (choice["best_other"] if choice["validation_difference"] > choice["se_of_difference"]
                           else "s")
    assert "choice: S =" in (tmp_path / "fdc_scale.md").read_text()
