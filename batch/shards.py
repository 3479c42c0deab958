"""The output folder of a job: its record (job.json), its shards, and what a re-run skips.

Item i belongs to shard i // shard_size; a shard is written once, whole, when every row of its items has arrived:
to a hidden temporary file renamed into place (`part-00042.parquet`), so a shard that exists is complete and an
interrupted job loses only the shards it had not finished. job.json records what decides the rows (the items' digest,
each classifier's model id and tower variant, labels, top_k, format, shard size); a re-run with the same --out must
ask for the same job, and then writes only the missing shards.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fvgpt.errors import FVGPTError

JOB = "job.json"
SUMMARY = "summary.json"
SHARD = re.compile(r"^part-(\d{5,})\.(parquet|csv)$")


class OutputError(FVGPTError):
    """An --out that holds something else (a usage error: exit 2)."""


@dataclass(frozen=True)
class JobRecord:
    items: int
    digest: str
    models: list[dict[str, Any]]  # name, version, model_id, tower_id, runtime, precision
    labels: list[str] | None
    top_k: int | None
    all_probabilities: bool
    format: str
    shard_size: int

    @property
    def shards(self) -> int:
        return -(-self.items // self.shard_size)


def shard_name(shard: int, fmt: str) -> str:
    return f"part-{shard:05d}.{fmt}"


def prepare(out: Path, record: JobRecord) -> set[int]:
    """Create --out for `record`, or check that it holds the same job; the shards already written."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / JOB
    wanted = asdict(record)
    if path.is_file():
        held = json.loads(path.read_text())
        differs = sorted(k for k in wanted if held.get(k) != wanted[k])
        if differs:
            raise OutputError(f"{out} holds another job (it differs in: {', '.join(differs)}); use a new --out, or "
                              f"delete {out} to start over")
    else:
        if any(SHARD.match(p.name) for p in out.iterdir()):
            raise OutputError(f"{out} holds shards but no {JOB}: not a folder `fvgpt classify` wrote; use a new --out")
        tmp = out / f".{JOB}.tmp"
        tmp.write_text(json.dumps(wanted, indent=2) + "\n")
        tmp.replace(path)
    return {int(m.group(1)) for p in out.iterdir() if (m := SHARD.match(p.name)) and m.group(2) == record.format}


def write_atomic(table: Any, path: Path, fmt: str, metadata: dict[str, Any]) -> None:
    """A pyarrow table to `path` whole or not at all (a hidden temporary file, renamed)."""
    import pyarrow as pa

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table.replace_schema_metadata({b"fvgpt": json.dumps(metadata).encode()}), tmp)
        else:
            import pyarrow.csv as pcsv

            lists = {i for i, f in enumerate(table.schema) if pa.types.is_list(f.type)}
            columns = [pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string())
                       if i in lists else col for i, col in enumerate(table.columns)]
            pcsv.write_csv(pa.table(columns, names=table.column_names), tmp)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C (or a full disk) while writing: no half-written file left behind
        tmp.unlink(missing_ok=True)
        raise
