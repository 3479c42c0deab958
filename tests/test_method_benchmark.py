"""`python -m benchmarks.method --quick`: every method and the paper's ablations over seeds in the generated world,
written as the issue's method.json schema (plus the world checks and binomial SEs), a CSV, a Markdown table and a
plot; the ablation rows change only what they switch off."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from benchmarks.method import METHODS, METRICS, main

TABLE3 = ("no_frg", "pc_only", "no_pc", "fdc_only")
NAMES = {"zero_shot", "coop", "kgcoop", "promptsrc", "mmrl"} | {
    f"fvgpt_{m}" for m in ("coop", "kgcoop", "promptsrc", "mmrl")} | {f"fvgpt_{m}_{a}" for m in ("coop", "kgcoop")
                                                                     for a in TABLE3}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("method")
    assert main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "method.json").read_text())


def test_method_json_has_the_issue_schema(report):
    out, doc = report
    assert set(doc["methods"]) == NAMES == set(METHODS)
    n = doc["settings"]["test_images"]
    for name, row in doc["methods"].items():
        assert set(row) == set(METRICS) == {"base", "new", "hm", "d_fg"}, name
        for metric, cell in row.items():
            assert set(cell) == ({"mean", "std"} if metric == "d_fg" else {"mean", "std", "se"}), (name, metric)
            assert cell["std"] >= 0, (name, metric)
        assert 0 <= row["base"]["mean"] <= 100 and 0 <= row["new"]["mean"] <= 100 and row["d_fg"]["mean"] >= 0
        for split in ("base", "new"):  # the binomial SE of an accuracy on n images, computed here again
            p = row[split]["mean"] / 100
            assert row[split]["se"] == pytest.approx(100 * math.sqrt(p * (1 - p) / n), abs=1e-3), (name, split)
    assert set(doc["sensitivity"]) == {"0.9", "0"} and doc["sensitivity"]["0.9"] == doc["methods"]
    assert set(doc["sensitivity"]["0"]) == {m for m in NAMES if METHODS[m].every_rate}  # ablations: main rate
    assert doc["settings"]["steps"] == {"prompt": 1, "plugin": 1}  # 2 base classes × 2 shots, batch 4, one epoch
    assert (out / "method.png").stat().st_size > 10_000 and doc["plot"] == "method.png"
    csv_lines = (out / "method.csv").read_text().splitlines()
    assert csv_lines[0].startswith("correlation,method,seed,base,new,hm,d_fg,base_fg")
    assert len(csv_lines) == 1 + 2 * (len(NAMES) + len(doc["sensitivity"]["0"]))  # seeds × rows of both rates
    assert "| fvgpt_coop_pc_only | PC only |" in (out / "method.md").read_text()
    gates = doc["gates"]["0.9"]
    assert set(gates) == {"fvgpt_coop", "fvgpt_kgcoop", "fvgpt_coop_no_frg", "fvgpt_kgcoop_no_frg", "fvgpt_promptsrc",
                          "fvgpt_mmrl"}  # trained rows
    learners = doc["settings"]["per_learner"]  # each learner's own config, the same epochs (one in --quick)
    assert (learners["promptsrc"]["prompt_batch"], learners["promptsrc"]["optimizer"]) == (32, "sgd")
    assert (learners["mmrl"]["prompt_lr"], learners["mmrl"]["optimizer"]) == (0.001, "adamw")
    assert learners["promptsrc"]["gpa_mean"] == 1.5 and learners["promptsrc"]["gpa_std"] == pytest.approx(0.1)
    assert {c["crop_scale"] for c in learners.values()} == {0.5}  # the world's crops for every learner
    assert learners["promptsrc"]["steps"] == {"prompt": 1, "plugin": 1}
    assert 0 <= gates["fvgpt_coop"]["r_mean"] <= 1 and 0 <= gates["fvgpt_coop"]["b_new"] <= 1
    assert gates["fvgpt_coop_no_frg"]["r_mean"] == 1  # every view in the quick task is usable: r ≡ 1


def test_world_checks_are_computed_from_zero_shot_and_coop(report):
    """(a) CoOp New − zero-shot New, (b) zero-shot Base on the foreground view − on the full image, (c) CoOp Base −
    zero-shot Base: means over seeds of the per-seed rows, with their thresholds."""
    _, doc = report
    for rate, checks in doc["world_checks"].items():
        rows = [r for r in doc["per_seed"] if r["correlation"] == float(rate)]

        def mean(method: str, metric: str) -> float:
            values = [r[metric] for r in rows if r["method"] == method]
            return sum(values) / len(values)

        want = {"a": mean("coop", "new") - mean("zero_shot", "new"),
                "b": mean("zero_shot", "base_fg") - mean("zero_shot", "base"),
                "c": mean("coop", "base") - mean("zero_shot", "base")}
        for key, value in want.items():
            assert checks[key]["value"] == pytest.approx(value, abs=1e-3), (rate, key)
        assert checks["a"]["pass"] == (want["a"] <= -3) and checks["b"]["pass"] == (want["b"] >= 3)
        assert checks["c"]["pass"] == (want["c"] >= 3)
        assert checks["pass"] == all(checks[k]["pass"] for k in "abc")


def test_ablations_change_only_what_they_switch_off(report):
    """Per seed: zero-shot does not depend on the seed (same test set and model). The paper's Table 3 rows: PC only
    has CoOp's Base and FVG-PT's New; without PC the Base is FVG-PT's; FDC only has the Base of FDC + PC (no FRG);
    and every row with PC has FVG-PT's New (FDC + PC is trained on its own, so this is measured, not assumed)."""
    _, doc = report
    rows = {(r["correlation"], r["method"], r["seed"]): r for r in doc["per_seed"]}
    for rate, seed in {(r["correlation"], r["seed"]) for r in doc["per_seed"] if r["correlation"] == 0.9}:
        def row(name: str) -> dict:
            return rows[(rate, name, seed)]

        assert row("zero_shot")["base"] == rows[(rate, "zero_shot", 1)]["base"]
        for learner in ("coop", "kgcoop"):
            full = f"fvgpt_{learner}"
            assert row(f"{full}_pc_only")["base"] == row(learner)["base"]
            assert row(f"{full}_pc_only")["d_fg"] == row(learner)["d_fg"]
            assert row(f"{full}_pc_only")["new"] == row(full)["new"] == row(f"{full}_no_frg")["new"]
            assert row(f"{full}_no_pc")["base"] == row(full)["base"] and row(f"{full}_no_pc")["d_fg"] == row(full)["d_fg"]
            assert row(f"{full}_fdc_only")["base"] == row(f"{full}_no_frg")["base"]
    assert doc["methods"]["zero_shot"]["base"]["std"] == 0


def test_checks_only_trains_no_fvgpt(tmp_path):
    """--methods zero_shot,coop: the world checks without any FVG-PT row (a world is chosen blind to FVG-PT)."""
    assert main(["--quick", "--methods", "coop,zero_shot", "--sensitivity", "", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "method.json").read_text())
    assert list(doc["methods"]) == ["zero_shot", "coop"] and doc["gates"]["0.9"] == {}
    assert doc["world_checks"]["0.9"]["pass"] in (True, False)
    assert sorted(p.name for p in (tmp_path / "runs" / "corr0.9-seed1").iterdir()) == ["coop"]


def test_a_rerun_reuses_finished_runs_and_resumes_the_rest(tmp_path, capsys):
    """An interrupted benchmark run again with the same command: finished run dirs are evaluated, not trained again
    (their files untouched); an interrupted plugin stage resumes and a missing row is made, to the numbers of the
    uninterrupted run; a run dir of other settings is refused, not mixed into the table."""
    args = ["--quick", "--methods", "zero_shot,coop,fvgpt_coop,fvgpt_coop_pc_only", "--out", str(tmp_path)]
    assert main(args) == 0
    first = json.loads((tmp_path / "method.json").read_text())
    cell1, cell2 = tmp_path / "runs" / "corr0.9-seed1", tmp_path / "runs" / "corr0.9-seed2"
    stamps = {p: p.stat().st_mtime_ns for p in cell1.rglob("*") if p.is_file() and p.name != "metrics.json"}
    cut = cell2 / "fvgpt_coop"  # interrupted in its first plugin epoch: no state, no weights, no log line
    (cut / "plugin.safetensors").unlink()
    (cut / "state" / "plugin.pt").unlink()
    (cut / "progress.json").write_text(json.dumps({"prompt": {"epochs_done": 1, "done": True},
                                                   "plugin": {"epochs_done": 0, "done": False}}))
    log = [line for line in (cut / "train_log.jsonl").read_text().splitlines() if '"plugin"' not in line]
    (cut / "train_log.jsonl").write_text("\n".join(log) + "\n")
    shutil.rmtree(cell2 / "fvgpt_coop_pc_only")  # its copy never made
    capsys.readouterr()
    assert main(args) == 0
    # 0.9 seed 1: three; 0.9 seed 2: CoOp's stage 1; --quick's rate 0: CoOp and FVG-PT on both seeds
    assert "reusing 8 finished runs" in capsys.readouterr().out
    second = json.loads((tmp_path / "method.json").read_text())
    assert second["reused_runs"] == 8
    assert second["methods"] == first["methods"] and second["world_checks"] == first["world_checks"]
    assert ([{k: v for k, v in r.items() if k != "train_s"} for r in second["per_seed"]]
            == [{k: v for k, v in r.items() if k != "train_s"} for r in first["per_seed"]])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((cut / "progress.json").read_text())["plugin"]["done"]
    assert main(args[:-2] + ["--epochs", "2", "--out", str(tmp_path)]) == 2
    assert "holds a run of other settings" in capsys.readouterr().err


def test_bad_options_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "1", "--out", str(tmp_path)])
    assert "at least two seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--methods", "coop,fvgpt_coop_no_dist", "--out", str(tmp_path)])
    assert "unknown method(s) fvgpt_coop_no_dist" in capsys.readouterr().err
    assert main(["--quick", "--pretrained", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
