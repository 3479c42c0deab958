"""`fvgpt eval RUN RUN ...`: the runs' metrics as CoOp and FVG-PT users read them.

One row per dataset and method, mean ± std over its seeds (population std, as CoOp's parse_test_res computes it with
np.std), HM of the mean Base and mean New; then, over several datasets, the paper's "Average" row per method: mean
Base and mean New over the datasets' rows, and their HM (fvgpt.metrics.average_row).

A method is a model row of a run: zero-shot CLIP, the prompt learner of stage 1 (coop, kgcoop), and FVG-PT on it
(fvgpt+coop, fvgpt+kgcoop: FVG-PT on CoOp and on KgCoOp are different methods). Runs are seeds of one row when they
differ only in the seed (and where they ran: device, workers, eval batch) among the settings that row depends on:
zero-shot on the data and backbone settings, a prompt learner on everything but stage 2's, FVG-PT on everything. So a
zero-shot or CoOp row shared by a CoOp and a KgCoOp run, or by two stage-2 ablations, is counted once per seed. Rows
of one method with different settings are kept apart and named by the settings that differ (the same on every
dataset, so the average joins like with like).
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .config import DATA_SOURCE, TrainConfig, config_fields
from .metrics import average_row, harmonic_mean

NOT_A_SETTING = ("seed", "device", "workers", "eval_batch")  # seeds of one row may differ in these
ZERO_SHOT_SETTINGS = DATA_SOURCE + ("test_fraction", "base_classes", "model", "pretrained", "init_seed")
METRICS = ("base", "new")


@dataclass(frozen=True)
class RunResult:
    path: str
    config: TrainConfig
    metrics: dict  # fvgpt.evaluate.evaluate's result


@dataclass
class Row:
    dataset: str
    method: str
    setting: str  # the settings that tell this row from another of its dataset and method ("" when none do)
    seeds: list[int] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    base: list[float | None] = field(default_factory=list)
    new: list[float | None] = field(default_factory=list)

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        values = getattr(self, metric)
        if not values or None in values:
            return None, None
        return statistics.fmean(values), statistics.pstdev(values)

    @property
    def hm(self) -> float | None:
        base, new = self.mean_std("base")[0], self.mean_std("new")[0]
        return None if base is None or new is None else harmonic_mean(base, new)

    def record(self) -> dict:
        (base, base_std), (new, new_std) = self.mean_std("base"), self.mean_std("new")
        return {"dataset": self.dataset, "method": self.method, "setting": self.setting, "seeds": self.seeds,
                "base": base, "base_std": base_std, "new": new, "new_std": new_std, "hm": self.hm, "runs": self.runs}


@dataclass
class Summary:
    rows: list[Row]
    average: list[dict]  # per method (and setting): dataset count, mean Base, mean New, their HM
    notes: list[str]

    def to_json(self) -> dict:
        return {"rows": [r.record() for r in self.rows], "average": self.average, "notes": self.notes}


def method_of(row_name: str, cfg: TrainConfig) -> str:
    """A metrics row's method: zero-shot, the prompt learner, or FVG-PT on that prompt learner."""
    return f"fvgpt+{cfg.method}" if row_name == "fvgpt" else row_name


def _settings(method: str, cfg: TrainConfig) -> dict:
    """The settings a method's result depends on (besides the seed)."""
    if method == "zero-shot":
        names = ZERO_SHOT_SETTINGS
    else:
        plugin = method.startswith("fvgpt+")
        names = tuple(f.name for f in config_fields()
                      if f.name not in NOT_A_SETTING and (plugin or f.metadata["group"] != "plugin"))
    return {n: getattr(cfg, n) for n in names}


def _dataset_names(runs: list[RunResult]) -> dict[str, str]:
    """Data source (as JSON) → its name: the dataset's name, or the data folder's; the full path where two
    sources share a name."""
    sources = {json.dumps({k: getattr(r.config, k) for k in DATA_SOURCE}): r.config for r in runs}
    short = {key: cfg.dataset or Path(cfg.data).name for key, cfg in sources.items()}
    clash = {name for name in short.values() if list(short.values()).count(name) > 1}
    return {key: (str(Path(cfg.root) / cfg.dataset) if cfg.dataset else cfg.data) if short[key] in clash
            else short[key] for key, cfg in sources.items()}


def summarise(runs: list[RunResult]) -> Summary:
    names = _dataset_names(runs)
    rows: dict[str, Row] = {}
    settings: dict[str, dict] = {}
    notes = []
    for run in runs:
        dataset = names[json.dumps({k: getattr(run.config, k) for k in DATA_SOURCE})]
        for name, metrics in run.metrics["models"].items():
            method = method_of(name, run.config)
            key = json.dumps([dataset, method, _settings(method, run.config)], sort_keys=True)
            row = rows.setdefault(key, Row(dataset, method, ""))
            settings[key] = _settings(method, run.config)
            if run.config.seed in row.seeds:  # the same row of the same seed again (another method's run)
                continue
            row.seeds.append(run.config.seed)
            row.runs.append(run.path)
            for metric in METRICS:
                getattr(row, metric).append(metrics[metric])
        for split in METRICS:
            if run.metrics["test_images"][split] == 0:
                notes.append(f"'-': {run.path} has no {split} test images")
    _name_settings(rows, settings)
    ordered = sorted(rows.values(), key=lambda r: (r.dataset, _method_order(r.method), r.setting))
    return Summary(ordered, _average(ordered, notes), notes)


def _method_order(method: str) -> tuple[int, str]:
    return (0 if method == "zero-shot" else 2 if method.startswith("fvgpt+") else 1), method


def _name_settings(rows: dict[str, Row], settings: dict[str, dict]) -> None:
    """Rows of one method with different settings (other than the data source) are named by the settings that
    differ, the same way on every dataset, so that the average joins like with like."""
    groups: dict[str, list[str]] = {}
    for key, row in rows.items():
        groups.setdefault(row.method, []).append(key)
    for keys in groups.values():
        differ = [n for n in settings[keys[0]] if n not in DATA_SOURCE
                  and len({json.dumps(settings[k][n]) for k in keys}) > 1]
        for k in keys:
            rows[k].setting = ", ".join(f"{n}={_value(settings[k][n])}" for n in differ)


def _value(v) -> str:
    return ",".join(v) if isinstance(v, list) else str(v)


def _average(rows: list[Row], notes: list[str]) -> list[dict]:
    """The paper's average row per method over datasets (only with more than one dataset): a method missing on a
    dataset, or a dataset whose row cannot be scored, has no average ('-'), never a partial one."""
    datasets = sorted({r.dataset for r in rows})
    if len(datasets) < 2:
        return []
    by_method: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        by_method.setdefault((r.method, r.setting), {})[r.dataset] = r
    average = []
    for (method, setting), per_dataset in sorted(by_method.items(), key=lambda kv: (_method_order(kv[0][0]),
                                                                                   kv[0][1])):
        missing = [d for d in datasets if d not in per_dataset]
        if missing:
            notes.append(f"no average for {method}{f' ({setting})' if setting else ''}: no run on "
                         f"{', '.join(missing)}")
            base = new = hm = None
        else:
            base, new, hm = average_row([(r.mean_std("base")[0], r.mean_std("new")[0]) for r in per_dataset.values()])
        average.append({"method": method, "setting": setting, "datasets": len(per_dataset), "base": base, "new": new,
                        "hm": hm})
    return average


def _pm(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.2f} ± {std:.2f}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_summary(summary: Summary) -> str:
    """The table a terminal shows: per dataset its method rows, then the average rows."""
    def label(method: str, setting: str) -> str:
        return f"{method} ({setting})" if setting else method

    width = max([len(label(r.method, r.setting)) for r in summary.rows] + [len("method")]) + 2
    dwidth = max([len(r.dataset) for r in summary.rows] + [len("dataset")]) + 2
    head = f"{'dataset':<{dwidth}}{'method':<{width}}{'seeds':>6}{'Base':>16}{'New':>16}{'HM':>8}"
    lines = [head]
    for r in summary.rows:
        lines.append(f"{r.dataset:<{dwidth}}{label(r.method, r.setting):<{width}}{len(r.seeds):>6}"
                     f"{_pm(*r.mean_std('base')):>16}{_pm(*r.mean_std('new')):>16}{_num(r.hm):>8}")
    if summary.average:
        datasets = len({r.dataset for r in summary.rows})
        lines.append(f"\naverage over {datasets} datasets (the paper's row: mean Base, mean New, HM of the two)")
        for a in summary.average:
            lines.append(f"{'average':<{dwidth}}{label(a['method'], a['setting']):<{width}}{'':>6}"
                         f"{_num(a['base']):>16}{_num(a['new']):>16}{_num(a['hm']):>8}")
    lines += [f"note: {n}" for n in summary.notes]
    return "\n".join(lines)


def summary_csv(summary: Summary) -> str:
    """One line per row and per average row (dataset "average"), percentages to 4 decimals; empty cells where a
    value does not exist."""
    out = io.StringIO()
    columns = ["dataset", "method", "setting", "seeds", "base", "base_std", "new", "new_std", "hm"]
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    def rounded(row: dict) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}

    for r in summary.rows:
        writer.writerow(rounded(r.record() | {"seeds": " ".join(map(str, r.seeds))}))
    for a in summary.average:
        writer.writerow(rounded(a | {"dataset": "average", "seeds": ""}))
    return out.getvalue().rstrip("\n")
