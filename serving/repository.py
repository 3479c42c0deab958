"""The model repository of the API process: which classifiers a folder holds, in which versions, which of them are
loaded (ready) and which were refused (failed, with the reason), and how a request's `model`/`models` resolve.

Layout (like Triton's model repository):

    DIR/NAME/VERSION/manifest.json ...   a classifier NAME in integer-named versions; the highest ready one is served
                                         unless a request names one (NAME@VERSION)
    DIR/NAME/manifest.json ...           a classifier with one version, "1"

A single bundle (`fvgpt serve BUNDLE`) is a repository of one: NAME is the bundle folder's name, its version "1".
Entries whose name starts with "." are ignored, so `cp -r b DIR/.b.tmp && mv DIR/.b.tmp DIR/b` adds a bundle
atomically, and `fvgpt export` (which writes into a hidden sibling and renames) can write into DIR directly.

Each version folder has a signature (its entries' inode, size and mtime): a scan that sees a new or changed signature
loads that version again, one that no longer sees it removes it. Loading verifies the bundle (manifest digest, every
file's sha256), loads its tables and heads, its tokenizer and text graph (so the loaded classifier no longer reads its
folder) and runs the heads once; anything that fails refuses that version alone, with the reason.

Requests hold the Classifier objects they resolved, never the repository: a request finishes on the version it
started with, whatever happens to the folder meanwhile. The repository is only changed by one task at a time (the
service's sync), and publishes immutable snapshots, so readers need no lock.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import MANIFEST, BundleError
from fvgpt_runtime.tuning import check_request, choose

from .errors import ApiError

logger = logging.getLogger("bentoml.fvgpt")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION = re.compile(r"^[0-9]{1,9}$")
SINGLE_VERSION = "1"
ALL = "*"
REMOVAL_RECHECK_S = 0.25


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


@dataclass(frozen=True)
class Classifier:
    """One version of one classifier, as /models lists it. `bundle` is set when ready."""

    name: str
    version: str
    path: Path
    signature: tuple
    state: str
    reason: str | None = None
    bundle: Bundle | None = field(default=None, repr=False, compare=False)
    tower_id: str | None = None  # the tower variant it runs (fvgpt_runtime.tuning.choose: runtime × precision)
    runtime: str | None = None
    precision: str | None = None
    device: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def failed(self, reason: str) -> Classifier:
        return replace(self, state="failed", reason=reason, bundle=None)

    def record(self, default: bool) -> dict:
        b = self.bundle
        return {"name": self.name, "version": self.version, "default": default, "state": self.state,
                "reason": self.reason, "kind": b.kind if b else None, "model_id": b.model_id if b else None,
                "tower_id": self.tower_id, "runtime": self.runtime, "precision": self.precision,
                "classes": len(b.classes.names) if b else None}


# ---- scanning ---------------------------------------------------------------------------------------------------

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


# ---- loading ----------------------------------------------------------------------------------------------------

def load(found: Found, runtime: str, precision: str | None, max_batch: int) -> Classifier:
    """A ready Classifier, or a failed one with the reason; never raises for anything inside the bundle. Its tower
    variant is the one fvgpt_runtime.tuning chooses for this host (the bundle's tuning profile, narrowed by
    --runtime/--precision, or the safe default)."""
    base = Classifier(found.name, found.version, found.path, found.signature, "loading")
    if found.problem:
        return base.failed(found.problem)
    try:
        bundle = Bundle(found.path, threads=1)
        try:
            check_request(bundle.manifest, runtime, precision)
        except BundleError as exc:
            return base.failed(f"{exc}; the server runs --runtime {runtime} --precision {precision or 'default'}")
        choice = choose(found.path, bundle.manifest, runtime, precision)
        tower = bundle.manifest.image_tower(choice.runtime, choice.precision)
        logger.info("fvgpt repository: %s@%s runs tower %s-%s: %s", found.name, found.version, choice.runtime,
                    choice.precision, choice.reason)
        if bundle.max_batch < max_batch:
            return base.failed(f"the bundle's graphs take batches of at most {bundle.max_batch}, and the server "
                               f"forms batches of up to {max_batch} (--max-batch-size)")
        bundle.open_text()
        dim = bundle.manifest.backbone.embed_dim
        logits = bundle.scores(np.full((1, dim), dim ** -0.5, np.float32)).logits
        if logits.shape != (1, len(bundle.classes.names)):
            return base.failed(f"the heads return {logits.shape}, not (1, {len(bundle.classes.names)})")
    except Exception as exc:  # noqa: BLE001 - an untrusted bundle may fail in any library; it must not stop others
        return base.failed(f"{type(exc).__name__}: {exc}")
    return replace(base, state="ready", bundle=bundle, tower_id=tower.id, runtime=choice.runtime,
                   precision=choice.precision, device=choice.device)


# ---- state and resolution ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """The repository at one moment: every version seen, and per name the version served by default."""

    classifiers: dict[tuple[str, str], Classifier] = field(default_factory=dict)
    scanned: bool = False  # the first scan of the source has been loaded
    defaults: dict[str, Classifier] = field(init=False, repr=False)  # name → its highest ready version

    def __post_init__(self) -> None:
        defaults: dict[str, Classifier] = {}
        for c in sorted(self.classifiers.values(), key=lambda c: version_order(c.version)):
            if c.ready:
                defaults[c.name] = c  # the highest ready version wins
        object.__setattr__(self, "defaults", defaults)

    @property
    def names(self) -> list[str]:
        return sorted({name for name, _ in self.classifiers})

    @property
    def ready(self) -> list[Classifier]:
        return [c for c in self.classifiers.values() if c.ready]

    def records(self) -> list[dict]:
        return [c.record(self.defaults.get(c.name) is c) for c in self.classifiers.values()]

    def towers(self) -> dict[str, Classifier]:
        """One ready classifier per tower id (the first by name): where a tower can be opened from."""
        out: dict[str, Classifier] = {}
        for c in self.ready:
            out.setdefault(c.tower_id, c)
        return out

    def _versions(self, name: str) -> list[Classifier]:
        return [c for (n, _), c in self.classifiers.items() if n == name]

    def one(self, ref: str) -> Classifier:
        """"NAME" (its default version) or "NAME@VERSION" → a ready classifier, else a 404 or 503 naming why."""
        name, at, version = ref.partition("@")
        versions = self._versions(name)
        if not versions:
            self._check_any()
            raise ApiError(404, f"no classifier named {name!r}; the repository has: {', '.join(self.names)} "
                                f"(GET /models)")
        if at:
            chosen = [c for c in versions if c.version == version]
            if not chosen:
                raise ApiError(404, f"classifier {name!r} has no version {version!r}; it has: "
                                    f"{', '.join(c.version for c in versions)}")
            return _servable(chosen[0])
        if name in self.defaults:
            return self.defaults[name]
        return _servable(max(versions, key=lambda c: version_order(c.version)))

    def resolve(self, model: str | None, models: list[str] | None, limit: int) -> list[Classifier]:
        """The classifiers a request names: `model` (one), `models` (a list, or ["*"] for every ready one), or
        neither (the only classifier, when there is exactly one)."""
        if models is None:
            if model is not None:
                return [self.one(model)]
            self._check_any()
            if len(self.names) == 1:
                return [self.one(self.names[0])]
            raise ApiError(400, f"the server holds {len(self.names)} classifiers: name one with 'model' (or several "
                                f"with 'models', or \"models\": \"*\" for all): {', '.join(self.names)}")
        if models == [ALL]:
            self._check_any()
            chosen = sorted(self.defaults.values(), key=lambda c: c.name)
            if not chosen:
                raise ApiError(503, "no classifier is ready (GET /models has the reasons)", {"Retry-After": "1"})
        else:
            chosen = [self.one(ref) for ref in models]
        if len(chosen) > limit:
            raise ApiError(400, f"the request names {len(chosen)} classifiers; at most {limit} (FVGPT_MAX_MODELS)")
        return chosen

    def _check_any(self) -> None:
        if not self.names:
            if not self.scanned:
                raise ApiError(503, "the model repository is still loading; retry shortly", {"Retry-After": "1"})
            raise ApiError(404, "the model repository holds no classifiers yet")


def _servable(c: Classifier) -> Classifier:
    if c.ready:
        return c
    if c.state == "loading":
        raise ApiError(503, f"classifier {c.ref} is loading; retry shortly", {"Retry-After": "1"})
    raise ApiError(503, f"classifier {c.ref} is not served: {c.reason}")


class Repository:
    """The source folder and its current Snapshot. Changed only through `apply` (one sync at a time)."""

    def __init__(self, source: Path, single: bool, runtime: str, precision: str | None, max_batch: int):
        self.source, self.single = source, single
        self.runtime, self.precision, self.max_batch = runtime, precision, max_batch
        self.snapshot = Snapshot()

    def plan(self, retry_failed: bool = False) -> tuple[list[Found], list[tuple[str, str]]]:
        """(versions to load: new, changed, or failed when retrying; keys of versions gone from the folder). A
        version missing from a scan is looked for again REMOVAL_RECHECK_S later: replacing a folder takes two
        renames (old one away, new one in), and a scan between them must not drop a classifier in use."""
        found = scan(self.source, self.single)
        current = self.snapshot.classifiers
        seen = {f.key for f in found}
        if any(key not in seen for key in current):
            time.sleep(REMOVAL_RECHECK_S)
            found = scan(self.source, self.single)
            seen = {f.key for f in found}
        to_load = [f for f in found if f.key not in current or current[f.key].signature != f.signature
                   or (retry_failed and current[f.key].state == "failed")]
        return to_load, [key for key in current if key not in seen]

    def load(self, found: Found) -> Classifier:
        return load(found, self.runtime, self.precision, self.max_batch)

    def apply(self, loaded: Iterable[Classifier] = (), removed: Iterable[tuple[str, str]] = (),
              scanned: bool | None = None) -> None:
        classifiers = dict(self.snapshot.classifiers)
        for c in loaded:
            previous = classifiers.get((c.name, c.version))
            classifiers[(c.name, c.version)] = c
            if c.ready:
                logger.info("fvgpt repository: %s %s (%s, %s, %d classes, tower %s)", c.ref,
                            "replaced" if previous else "ready", c.bundle.kind, c.bundle.model_id,
                            len(c.bundle.classes.names), c.tower_id)
            else:
                logger.warning("fvgpt repository: %s refused: %s", c.ref, c.reason)
        for key in removed:
            if classifiers.pop(key, None) is not None:
                logger.info("fvgpt repository: %s@%s removed", *key)
        ordered = dict(sorted(classifiers.items(), key=lambda kv: (kv[0][0], version_order(kv[0][1]))))
        self.snapshot = Snapshot(ordered, self.snapshot.scanned if scanned is None else scanned)
