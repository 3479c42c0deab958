"""The model repository's folder layout and classifier references, as plain functions: what a scan of the folder
sees, and what "NAME" / "NAME@VERSION" mean.

    DIR/NAME/VERSION/manifest.json   versions are integers; the highest ready one is NAME's default
    DIR/NAME/manifest.json           a classifier with one version, "1"
    DIR/.anything                    ignored (stage a bundle there, then rename it in)

One bundle served alone is a repository of one: NAME is its folder's name, its version "1". Each version folder has a
signature (its entries' inode, size and mtime): what changes when it is replaced or written to.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .manifest import MANIFEST

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION = re.compile(r"^[0-9]{1,9}$")
SINGLE_VERSION = "1"


@dataclass(frozen=True)
class Found:
    """One version folder a scan saw (or a folder that cannot be one: `problem` says why)."""

    name: str
    version: str
    path: Path
    signature: tuple = ()
    problem: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version


def signature(folder: Path) -> tuple:
    """What changes when a version folder is replaced (new inode) or a file in it is written, added or removed."""
    st = folder.stat()
    with os.scandir(folder) as entries:
        files = sorted((e.name, (s := e.stat(follow_symlinks=False)).st_ino, s.st_size, s.st_mtime_ns)
                       for e in entries)
    return (st.st_ino, st.st_mtime_ns, *files)


def _found(name: str, version: str, path: Path) -> Found:
    try:
        return Found(name, version, path, signature(path))
    except OSError as exc:  # removed while we looked: the next scan will not see it
        return Found(name, version, path, problem=f"cannot read {path}: {exc.strerror or exc}")


def scan(source: Path, single: bool) -> list[Found]:
    """Every version folder under `source` (or the one bundle), sorted by (name, version)."""
    if single:
        return [_found(source.name, SINGLE_VERSION, source)]
    if not source.is_dir():
        return []
    found: list[Found] = []
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        path = Path(entry.path)
        if not NAME.match(entry.name):
            found.append(Found(entry.name, "", path, problem=f"{entry.name!r} is not a classifier name: use letters, "
                                                             f"digits, '_', '-' and '.', at most 64 characters"))
        elif (path / MANIFEST).is_file():
            found.append(_found(entry.name, SINGLE_VERSION, path))
        else:
            versions = [v for v in os.scandir(path) if v.is_dir() and not v.name.startswith(".")]
            for v in versions:
                if VERSION.match(v.name):
                    found.append(_found(entry.name, str(int(v.name)), Path(v.path)))
                else:
                    found.append(Found(entry.name, v.name, Path(v.path), problem="version folders are named by "
                                                                                  "integers (1, 2, ...)"))
            if not versions:
                found.append(Found(entry.name, "", path, problem=f"{path} holds neither a bundle ({MANIFEST}) nor "
                                                                 f"version folders (1/, 2/, ...)"))
    return sorted(found, key=lambda f: (f.name, version_order(f.version)))


def version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if VERSION.match(version) else (-1, version)


def split_ref(ref: str) -> tuple[str, str | None]:
    """"NAME" → (NAME, None): its default version; "NAME@VERSION" → (NAME, VERSION)."""
    name, at, version = ref.partition("@")
    return name, version if at else None
