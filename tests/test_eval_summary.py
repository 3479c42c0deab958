"""`fvgpt eval RUN RUN ...` as CoOp and FVG-PT users read it (issue 21.4): rows per dataset and method, mean ± std over
seeds as CoOp's parse_test_res (np.std), the paper's average row per method, on constructed runs whose expected
figures are computed here with NumPy; and end to end, stored metrics read unless --recompute."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from conftest import needs_torch
from fvgpt.config import TrainConfig
from fvgpt.summary import RunResult, format_summary, summarise, summary_csv


def run(dataset: str, method: str, seed: int, rows: dict[str, tuple[float | None, float | None]],
        **settings) -> RunResult:
    cfg = TrainConfig(dataset=dataset, root="/data", method=method, seed=seed, **settings)
    metrics = {"models": {name: {"base": b, "new": n} for name, (b, n) in rows.items()},
               "test_images": {"base": 0 if any(b is None for b, _ in rows.values()) else 10,
                               "new": 0 if any(n is None for _, n in rows.values()) else 10}}
    return RunResult(f"runs/{dataset}-{method}-{seed}", cfg, metrics)


def hm(b: float, n: float) -> float:
    return 2 * b * n / (b + n)


# CoOp and KgCoOp runs, three seeds each, on two datasets; zero-shot is the same in every run of a dataset
ZS = {"caltech101": (90.0, 88.0), "dtd": (50.0, 55.0)}
COOP = {"caltech101": [(97.0, 80.0), (96.0, 84.0), (98.5, 79.0)], "dtd": [(80.0, 45.0), (78.0, 50.0), (81.0, 47.0)]}
FV_COOP = {"caltech101": [(97.5, 92.0), (97.0, 93.0), (98.0, 91.5)], "dtd": [(81.0, 56.0), (79.0, 58.0), (80.5, 57.0)]}
KG = {"caltech101": [(96.0, 90.0), (95.5, 91.0), (96.5, 89.0)], "dtd": [(77.0, 55.0), (76.0, 54.0), (78.0, 56.0)]}
FV_KG = {"caltech101": [(97.0, 94.0), (96.0, 95.0), (97.5, 93.5)], "dtd": [(79.0, 60.0), (78.0, 61.0), (80.0, 59.0)]}


def runs() -> list[RunResult]:
    out = []
    for dataset, zero_shot in ZS.items():
        for i, seed in enumerate((1, 2, 3)):
            out.append(run(dataset, "coop", seed, {"zero-shot": zero_shot, "coop": COOP[dataset][i],
                                                   "fvgpt": FV_COOP[dataset][i]}))
            out.append(run(dataset, "kgcoop", seed, {"zero-shot": zero_shot, "kgcoop": KG[dataset][i],
                                                     "fvgpt": FV_KG[dataset][i]}))
    return out


def test_rows_per_dataset_and_method_with_mean_and_std_over_seeds():
    summary = summarise(runs())
    rows = {(r.dataset, r.method): r.record() for r in summary.rows}
    methods = ["zero-shot", "coop", "kgcoop", "fvgpt+coop", "fvgpt+kgcoop"]
    assert [(r.dataset, r.method) for r in summary.rows] == [(d, m) for d in ("caltech101", "dtd") for m in methods]
    for dataset in ZS:
        for method, values in (("coop", COOP), ("kgcoop", KG), ("fvgpt+coop", FV_COOP), ("fvgpt+kgcoop", FV_KG)):
            r, v = rows[dataset, method], np.array(values[dataset])
            assert r["seeds"] == [1, 2, 3] and r["setting"] == ""
            assert r["base"] == pytest.approx(v[:, 0].mean()) and r["base_std"] == pytest.approx(v[:, 0].std())
            assert r["new"] == pytest.approx(v[:, 1].mean()) and r["new_std"] == pytest.approx(v[:, 1].std())
            assert r["hm"] == pytest.approx(hm(v[:, 0].mean(), v[:, 1].mean()))
        zs = rows[dataset, "zero-shot"]  # in all six runs of the dataset, counted once per seed
        assert zs["seeds"] == [1, 2, 3] and len(zs["runs"]) == 3
        assert (zs["base"], zs["base_std"], zs["new"]) == (ZS[dataset][0], 0.0, ZS[dataset][1])
    average = {a["method"]: a for a in summary.average}
    assert list(average) == methods
    for method, values in (("coop", COOP), ("fvgpt+kgcoop", FV_KG)):
        base = np.mean([np.array(values[d])[:, 0].mean() for d in ZS])
        new = np.mean([np.array(values[d])[:, 1].mean() for d in ZS])
        a = average[method]
        assert a["datasets"] == 2 and a["base"] == pytest.approx(base) and a["new"] == pytest.approx(new)
        assert a["hm"] == pytest.approx(hm(base, new))
    assert summary.notes == []
    table = format_summary(summary)
    assert "average over 2 datasets" in table
    caltech_coop = np.array(COOP["caltech101"])
    assert f"{caltech_coop[:, 0].mean():.2f} ± {caltech_coop[:, 0].std():.2f}" in table


def test_csv_for_scripts():
    summary = summarise(runs())
    lines = list(csv.DictReader(io.StringIO(summary_csv(summary))))
    assert len(lines) == 10 + 5 and lines[-1]["dataset"] == "average"
    dtd_kg = next(r for r in lines if (r["dataset"], r["method"]) == ("dtd", "fvgpt+kgcoop"))
    v = np.array(FV_KG["dtd"])
    assert float(dtd_kg["new"]) == pytest.approx(v[:, 1].mean(), abs=1e-4) and dtd_kg["seeds"] == "1 2 3"
    assert float(dtd_kg["new_std"]) == pytest.approx(v[:, 1].std(), abs=1e-4)


def test_missing_methods_splits_and_other_settings_are_named_never_dropped():
    mixed = runs()[:6]  # caltech101 only
    mixed.append(run("dtd", "coop", 1, {"zero-shot": ZS["dtd"], "coop": (80.0, None), "fvgpt": (81.0, None)}))
    mixed.append(run("caltech101", "coop", 1, {"zero-shot": ZS["caltech101"], "coop": COOP["caltech101"][0],
                                               "fvgpt": (99.0, 99.0)}, lambda_d=1.0))  # a stage-2 ablation
    summary = summarise(mixed)
    rows = {(r.dataset, r.method, r.setting): r.record() for r in summary.rows}
    # the ablation is its own FVG-PT row; its CoOp stage (same seed, same stage-1 settings) is not counted twice
    assert rows["caltech101", "fvgpt+coop", "lambda_d=1.0"]["base"] == 99.0
    assert rows["caltech101", "fvgpt+coop", "lambda_d=10.0"]["seeds"] == [1, 2, 3]
    assert rows["caltech101", "coop", ""]["seeds"] == [1, 2, 3]
    dtd = rows["dtd", "coop", ""]
    assert dtd["base"] == 80.0 and dtd["new"] is None and dtd["hm"] is None
    average = {(a["method"], a["setting"]): a for a in summary.average}
    assert average["coop", ""]["new"] is None and average["coop", ""]["base"] == pytest.approx(
        (np.array(COOP["caltech101"])[:, 0].mean() + 80.0) / 2)
    assert average["kgcoop", ""]["base"] is None  # no KgCoOp run on dtd: no average, never a partial one
    assert "no average for kgcoop: no run on dtd" in summary.notes
    assert "'-': runs/dtd-coop-1 has no new test images" in summary.notes
    assert "nan" not in format_summary(summary).lower()


@needs_torch
def test_eval_reads_stored_metrics_unless_asked_to_recompute(demo_data, tmp_path, capsys):
    from fvgpt.cli import main

    tiny = ["--data", str(demo_data), "--model", "fvgpt-tiny", "--pretrained", "none", "--shots", "3", "--epochs", "1",
            "--lr", "0.02", "--quiet"]
    runs = {(m, s): tmp_path / f"{m}-{s}" for m, s in (("coop", 1), ("coop", 2), ("kgcoop", 1))}
    for (method, seed), out in runs.items():
        assert main(["train", *tiny, "--method", method, "--seed", str(seed), "--out", str(out)]) == 0
    stored = {k: json.loads((r / "metrics.json").read_text()) for k, r in runs.items()}
    capsys.readouterr()
    assert main(["eval", *map(str, runs.values()), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert err.count("its metrics.json of") == 3 and "evaluated" not in err  # read, not evaluated again
    doc = json.loads(out)
    rows = {(r["method"], r["setting"]): r for r in doc["rows"]}
    assert set(rows) == {("zero-shot", ""), ("coop", ""), ("kgcoop", ""), ("fvgpt+coop", ""), ("fvgpt+kgcoop", "")}
    for method, name, keys in (("coop", "coop", [("coop", 1), ("coop", 2)]),
                               ("fvgpt+coop", "fvgpt", [("coop", 1), ("coop", 2)]),
                               ("fvgpt+kgcoop", "fvgpt", [("kgcoop", 1)])):
        base = np.array([stored[k]["models"][name]["base"] for k in keys])
        assert rows[method, ""]["seeds"] == [s for _, s in keys]
        assert rows[method, ""]["base"] == pytest.approx(base.mean())
        assert rows[method, ""]["base_std"] == pytest.approx(base.std())
    assert doc["average"] == []  # one dataset

    # a stored file is what eval shows; --recompute evaluates and writes the run's real metrics back
    planted = stored["coop", 1] | {"models": stored["coop", 1]["models"] | {"fvgpt": {
        **stored["coop", 1]["models"]["fvgpt"], "base": 12.5}}}
    (runs["coop", 1] / "metrics.json").write_text(json.dumps(planted))
    assert main(["eval", str(runs["coop", 1])]) == 0
    assert "12.50" in capsys.readouterr().out
    assert main(["eval", str(runs["coop", 1]), "--recompute", "--quiet"]) == 0
    assert capsys.readouterr().err.strip().endswith("evaluated")
    again = json.loads((runs["coop", 1] / "metrics.json").read_text())
    assert again["models"] == stored["coop", 1]["models"]
    # metrics of other weights are not the run's: evaluated again
    again["evaluated"]["weights"]["plugin.safetensors"] = "0" * 64
    (runs["coop", 1] / "metrics.json").write_text(json.dumps(again))
    assert main(["eval", str(runs["coop", 1]), "--format", "csv", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err.strip().endswith("evaluated") and out.splitlines()[0].startswith("dataset,method,setting,seeds")
