"""What `fvgpt classify` reads: each --input, expanded on the driver into numbered items in a fixed order.

    a folder      every image file under it, recursively (by extension, case-insensitive; hidden entries skipped)
    a glob        what it matches (`**` recurses), image files or not: a non-image is a row with its error
    an image      itself
    a table       a .parquet or .csv file: its --column holds paths (relative ones are relative to the table's folder)
                  or, in Parquet, the image bytes (the decode stage reads them from the file, a row group at a time)

The order (inputs as given; each expanded in sorted order) numbers the items, and the numbers decide the shards, so a
re-run over the same inputs skips exactly the shards already written (shards.py).
"""
from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from fvgpt.errors import FVGPTError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TABLES = (".parquet", ".csv")
DEFAULT_COLUMNS = ("path", "image", "bytes")  # looked for, in order, when --column is not given


class InputsError(FVGPTError):
    """An --input that cannot be read as a list of images (a usage error: exit 2)."""


@dataclass(frozen=True)
class Items:
    """The items of a job: `paths[i]` names item i in the output; `tables[i]` / `rows[i]` say where its bytes are
    when they come from a Parquet column ("" / -1 for files)."""

    paths: list[str]
    tables: list[str]
    rows: list[int]
    column: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def digest(self) -> str:
        """What a re-run must find again to continue a job: the items, in order."""
        h = hashlib.sha256()
        for p in self.paths:
            h.update(p.encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()


def _images_under(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _table(path: Path, column: str | None) -> Items:
    import pyarrow as pa

    if path.suffix.lower() == ".csv":
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(path)
        schema = table.schema
    else:
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        table = None
    names = schema.names
    chosen = column or next((c for c in DEFAULT_COLUMNS if c in names), None)
    if chosen is None or chosen not in names:
        raise InputsError(f"{path} has no column {chosen or ' / '.join(DEFAULT_COLUMNS)!r} (columns: "
                          f"{', '.join(names)}); name the one with the paths or bytes with --column")
    kind = schema.field(chosen).type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        if table is not None:
            raise InputsError(f"{path}: a CSV column holds text, not image bytes; use Parquet for bytes")
        import pyarrow.parquet as pq

        n = pq.ParquetFile(path).metadata.num_rows
        return Items([f"{path}#{i}" for i in range(n)], [str(path)] * n, list(range(n)), chosen)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputsError(f"{path} column {chosen!r} is {kind}: it must hold paths (strings) or image bytes")
    if table is None:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[chosen])
    values = table.column(chosen).to_pylist()
    paths = [str(path.parent / v) if v and not os.path.isabs(v) else (v or "") for v in values]
    return Items(paths, [""] * len(paths), [-1] * len(paths))


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # a file name that is not UTF-8 comes from os.walk / glob with lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def expand(inputs: list[str], column: str | None = None) -> Items:
    """Every --input → the job's items, in order; an InputsError names an input that matches nothing."""
    paths: list[str] = []
    tables: list[str] = []
    rows: list[int] = []
    used_column = None
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = _images_under(path)
        elif path.suffix.lower() in TABLES and path.is_file():
            items = _table(path, column)
            paths += items.paths
            tables += items.tables
            rows += items.rows
            used_column = used_column or items.column
            continue
        elif glob.has_magic(spec):
            found = sorted(f for f in glob.glob(spec, recursive=True) if not os.path.isdir(f))
            if not found:
                raise InputsError(f"--input {spec!r} matches no file")
        elif path.is_file():
            found = [spec]
        else:
            raise InputsError(f"--input {spec!r} is neither a folder, a file nor a glob that matches anything")
        odd = next((f for f in found if not _utf8(f)), None)
        if odd is not None:  # the output's path column is UTF-8 text; such a name could not be written as it is
            raise InputsError(f"--input {spec!r}: the file name {odd.encode('utf-8', 'surrogateescape')!r} is not "
                              f"UTF-8 text; rename it (e.g. convmv) or list it in a Parquet table of image bytes")
        paths += found
        tables += [""] * len(found)
        rows += [-1] * len(found)
    if not paths:
        raise InputsError(f"no images found in {', '.join(inputs)} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return Items(paths, tables, rows, used_column)
