"""The two Ray stages of `fvgpt classify`, each running fvgpt_runtime's steps (the server's per-image code):

    decode_batch   tasks: each item's bytes (a file, or a Parquet row) → checked, decoded, preprocessed pixels, once
                   per distinct preprocessing of the towers; a missing, oversized or unreadable image becomes an error
                   (its pixels zeros, never run)
    Towers         actors, each loading the classifiers once (unverified: the driver verified them): one tower pass
                   per image and tower variant, shared by every classifier on it, then each classifier's heads and
                   ranking → one output row per image and classifier

Both take and return columns (numpy in, pyarrow out of the actors), so Ray moves batches without pickling rows.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fvgpt_runtime.images import InputError, PixelLimits, decode, read_file

from fvgpt.preprocess import Preprocess

ERROR_KINDS = ("missing", "oversized", "unreadable")
PIXELS = np.float32  # decode_batch's output: preprocessed pixels, as the towers take them


@dataclass(frozen=True)
class Model:
    """One classifier of a job, as the driver resolved it: where its bundle is and which tower variant runs it."""

    name: str
    version: str
    path: str
    model_id: str
    tower_id: str
    runtime: str
    precision: str
    labels: list[str] | None  # the resolved label set (None: the bundled classes)
    top_k: int


def _table_bytes(table: str, column: str, rows: list[int]) -> dict[int, bytes]:
    """The bytes of `rows` of a Parquet column, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(table)
    wanted, out, start = set(rows), {}, 0
    for g in range(f.metadata.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if any(start <= r < start + n for r in wanted):
            values = f.read_row_group(g, columns=[column]).column(column).to_pylist()
            out |= {r: values[r - start] for r in wanted if start <= r < start + n}
        start += n
    return out


def _error_kind(exc: InputError, path: str, table: str) -> str:
    if exc.too_large:
        return "oversized"
    return "missing" if not table and not os.path.lexists(path) else "unreadable"


def pixel_bytes(cfgs: list[Preprocess]) -> int:
    """Bytes of one image's output of decode_batch: its pixels once per distinct preprocessing."""
    return sum(3 * cfg.size * cfg.size * np.dtype(PIXELS).itemsize for cfg in cfgs)


def decode_batch(batch: dict[str, np.ndarray], cfgs: list[Preprocess], limits: PixelLimits, jpeg_draft: bool,
                 max_bytes: int, column: str | None) -> dict[str, np.ndarray]:
    n = len(batch["index"])
    from_tables: dict[str, list[int]] = defaultdict(list)
    for table, row in zip(batch["table"], batch["row"]):
        if table:
            from_tables[table].append(int(row))
    table_bytes = {t: _table_bytes(t, column, rows) for t, rows in from_tables.items()}
    pixels = [np.zeros((n, 3, cfg.size, cfg.size), PIXELS) for cfg in cfgs]
    errors, kinds = np.full(n, "", object), np.full(n, "", object)
    for i, (path, table, row) in enumerate(zip(batch["path"], batch["table"], batch["row"])):
        try:
            if table:
                data = table_bytes[table][int(row)]
                if data is None:
                    raise InputError(f"{path} is null")
                if len(data) > max_bytes:
                    raise InputError(f"{path} is {len(data)} bytes; the limit is {max_bytes}", too_large=True)
            else:
                data = read_file(path, max_bytes)
            for out, arr in zip(pixels, decode(data, path, limits, cfgs, jpeg_draft)):
                out[i] = arr
        except InputError as exc:
            errors[i], kinds[i] = str(exc), _error_kind(exc, path, table)
    return {"index": batch["index"], "path": batch["path"], "error": errors, "error_kind": kinds,
            **{f"pixels_{j}": p for j, p in enumerate(pixels)}}


def output_schema(all_probabilities: bool) -> Any:
    import pyarrow as pa

    fields = [("index", pa.int64()), ("path", pa.string()), ("model", pa.string()), ("version", pa.string()),
              ("tower_id", pa.string()), ("head", pa.string()), ("labels", pa.list_(pa.string())),
              ("probabilities", pa.list_(pa.float32())), ("error", pa.string()), ("error_kind", pa.string()),
              ("node_id", pa.string())]
    if all_probabilities:
        fields.append(("all_probabilities", pa.list_(pa.float32())))
    return pa.schema(fields)


class Towers:
    """A Ray actor: every classifier of the job loaded once, and their towers (one per variant)."""

    def __init__(self, models: list[Model], cfgs: list[Preprocess], batch_size: int, threads: int | None,
                 all_probabilities: bool):
        from fvgpt_runtime.classifier import Classifier
        from fvgpt_runtime.repository import Found

        self.models, self.batch_size, self.all = models, batch_size, all_probabilities
        self.classifiers = []
        for m in models:
            c = Classifier(Found(m.name, m.version, Path(m.path)), m.runtime, m.precision,
                           threads, verify=False)
            if c.tower_id != m.tower_id:
                raise RuntimeError(f"{m.name}@{m.version} runs tower {c.tower_id} on this node, {m.tower_id} on the "
                                   f"driver: is the bundle at {m.path} the same file on every node?")
            self.classifiers.append(c)
        self.pixel_column = {m.tower_id: f"pixels_{cfgs.index(c.bundle.preprocess)}"
                             for m, c in zip(models, self.classifiers)}
        self.schema = output_schema(all_probabilities)
        try:
            import ray

            self.node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - outside Ray (tests of the stage alone)
            self.node_id = None

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        ok = batch["error"] == ""
        features: dict[str, np.ndarray] = {}
        for m, c in zip(self.models, self.classifiers):  # one tower pass per variant, for all its classifiers
            if m.tower_id not in features and ok.any():
                features[m.tower_id] = c.features(batch[self.pixel_column[m.tower_id]][ok], self.batch_size)
        n, good = len(ok), np.flatnonzero(ok)
        columns: dict[str, list] = defaultdict(list)
        for m, c in zip(self.models, self.classifiers):
            results, every = c.rank(features[m.tower_id], m.labels, m.top_k, self.all) if good.size else ([], None)
            by_row = dict(zip(good.tolist(), range(len(good))))
            for i in range(n):
                j = by_row.get(i)
                r = results[j] if j is not None else None
                columns["index"].append(int(batch["index"][i]))
                columns["path"].append(str(batch["path"][i]))
                columns["model"].append(m.name)
                columns["version"].append(m.version)
                columns["tower_id"].append(m.tower_id)
                columns["head"].append(r.head if r else None)
                columns["labels"].append([p.label for p in r.predictions] if r else None)
                columns["probabilities"].append([p.probability for p in r.predictions] if r else None)
                columns["error"].append(None if r else str(batch["error"][i]))
                columns["error_kind"].append(None if r else str(batch["error_kind"][i]))
                columns["node_id"].append(self.node_id)
                if self.all:
                    columns["all_probabilities"].append(every[j].tolist() if r else None)
        return pa.table({f.name: pa.array(columns[f.name], f.type) for f in self.schema}, schema=self.schema)
