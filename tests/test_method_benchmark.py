"""`python -m benchmarks.method --quick`: every method over seeds in the generated world, written as the issue's
method.json schema, a CSV, a Markdown table and a plot; the ablation switches do what they say."""
from __future__ import annotations

import json

import pytest

from benchmarks.method import METHODS, METRICS, main

NAMES = {"zero_shot", "coop", "kgcoop", "fvgpt_coop", "fvgpt_kgcoop", "fvgpt_coop_no_frg", "fvgpt_coop_no_dist",
         "fvgpt_coop_no_pc"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("method")
    assert main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "method.json").read_text())


def test_method_json_has_the_issue_schema(report):
    out, doc = report
    assert set(doc["methods"]) == NAMES == set(METHODS)
    for name, row in doc["methods"].items():
        assert set(row) == set(METRICS) == {"base", "new", "hm", "d_fg"}, name
        for metric, cell in row.items():
            assert set(cell) == {"mean", "std"} and cell["std"] >= 0, (name, metric)
        assert 0 <= row["base"]["mean"] <= 100 and 0 <= row["new"]["mean"] <= 100 and row["d_fg"]["mean"] >= 0
    assert set(doc["sensitivity"]) == {"0.9", "0"} and doc["sensitivity"]["0.9"] == doc["methods"]
    assert (out / "method.png").stat().st_size > 10_000 and doc["plot"] == "method.png"
    csv_lines = (out / "method.csv").read_text().splitlines()
    assert csv_lines[0].startswith("correlation,method,seed,base,new,hm,d_fg")
    assert len(csv_lines) == 1 + 2 * 2 * len(NAMES)  # rates × seeds × methods
    assert "| fvgpt_coop |" in (out / "method.md").read_text()
    gates = doc["gates"]["0.9"]["fvgpt_coop"]
    assert 0 <= gates["r_mean"] <= 1 and 0 <= gates["b_new"] <= 1
    assert doc["gates"]["0.9"]["fvgpt_coop_no_pc"]["b_new"] == 0  # no Prior Calibration: b ≡ 0


def test_ablations_change_only_what_they_switch_off(report):
    """Per seed: zero-shot does not depend on the seed (same test set and model); without Prior Calibration the new
    head is the stage-1 model's, and the base head (FDC) trains exactly as with it (L_PC reaches only the BRG)."""
    _, doc = report
    rows = {(r["correlation"], r["method"], r["seed"]): r for r in doc["per_seed"]}
    for rate, seed in {(r["correlation"], r["seed"]) for r in doc["per_seed"]}:
        def row(name: str) -> dict:
            return rows[(rate, name, seed)]

        assert row("zero_shot")["base"] == rows[(rate, "zero_shot", 1)]["base"]
        assert row("fvgpt_coop_no_pc")["new"] == row("coop")["new"]
        assert row("fvgpt_coop_no_pc")["base"] == row("fvgpt_coop")["base"]
        assert row("fvgpt_coop_no_pc")["d_fg"] == row("fvgpt_coop")["d_fg"]
    assert doc["methods"]["zero_shot"]["base"]["std"] == 0


def test_bad_options_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "1", "--out", str(tmp_path)])
    assert "at least two seeds" in capsys.readouterr().err
    assert main(["--quick", "--pretrained", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
