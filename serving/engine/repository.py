"""The live model repository: which classifier versions a server holds, each loaded once, and how a request's
"model" / "models" resolve to them. The folder layout and references are fvgpt_runtime.repository's.

Loading a version verifies its bundle once (manifest digest and every file's sha256, the tower graphs included),
loads its tables, heads, tokenizer and text graph (so the loaded classifier never reads its folder again), runs its
heads once, and resolves its tower variant (fvgpt_runtime.tuning.choose: the tuning profile, narrowed by
--runtime/--precision) into TowerSpecs the tower pool opens as they are: one per tower role (PromptSRC: CLIP's tower
and its prompted one; MMRL: the trunk, CLIP's branch reading it and its own branch reading it), each with the key of
its computation (Manifest.tower_keys), so classifiers sharing a graph share one open tower that runs once per image.
Anything that fails refuses that version alone, with the reason.

Requests hold the Classifier objects they resolved, never the repository: a request finishes on the version it
started with, whatever happens to the folder meanwhile. The repository is changed by one task at a time (the
engine's sync) and publishes immutable snapshots, so readers need no lock.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import BundleError
from fvgpt_runtime.repository import Found, scan, split_ref, version_order
from fvgpt_runtime.tuning import check_request, choose

from .errors import ApiError, retry_later
from .models import ALL_MODELS, ModelRecord
from .tower_worker import TowerSpec

logger = logging.getLogger("fvgpt.engine")

REMOVAL_RECHECK_S = 0.25


@dataclass(frozen=True)
class Classifier:
    """One version of one classifier, as /models lists it. `bundle`, `towers` and `tower_id` are set when ready."""

    name: str
    version: str
    path: Path
    signature: tuple
    state: str
    reason: str | None = None
    bundle: Bundle | None = field(default=None, repr=False, compare=False)
    towers: tuple[TowerSpec, ...] = field(default=(), repr=False, compare=False)  # per role, each after its source
    tower_id: str | None = None  # the bundle's variant id over all its roles (Manifest.variant_id)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def tower(self) -> TowerSpec | None:
        """The one tower of a one-role classifier (CoOp, KgCoOp, zero-shot); None with several roles."""
        return self.towers[0] if len(self.towers) == 1 else None

    @property
    def read(self) -> dict[str, list[str]]:
        """Tower id that takes pixels → the tower ids the heads read from it or from its readers."""
        out: dict[str, list[str]] = {}
        for t in self.towers:
            if t.out_shape:
                out.setdefault(t.source or t.tower_id, []).append(t.tower_id)
        return out

    def features(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The towers' outputs by tower id → this classifier's by role (what Bundle.scores takes)."""
        return {t.role: outputs[t.tower_id] for t in self.towers if t.out_shape}

    def failed(self, reason: str) -> Classifier:
        return replace(self, state="failed", reason=reason, bundle=None, towers=(), tower_id=None)

    def record(self, default: bool) -> ModelRecord:
        b, t = self.bundle, self.towers[0] if self.towers else None
        return ModelRecord.model_construct(
            name=self.name, version=self.version, default=default, state=self.state, reason=self.reason,
            kind=b.kind if b else None, model_id=b.model_id if b else None, tower_id=self.tower_id,
            towers={t.role: t.tower_id for t in self.towers} if self.towers else None,
            runtime=t.runtime if t else None, precision=t.precision if t else None,
            classes=len(b.classes.names) if b else None)


def load(found: Found, runtime: str, precision: str | None, max_batch: int) -> Classifier:
    """A ready Classifier, or a failed one with the reason; never raises for anything inside the bundle."""
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
        towers = tower_specs(bundle, found.path, choice.runtime, choice.precision, choice.device)
        logger.info("fvgpt repository: %s runs tower %s-%s: %s", base.ref, choice.runtime, choice.precision,
                    choice.reason)
        if bundle.max_batch < max_batch:
            return base.failed(f"the bundle's graphs take batches of at most {bundle.max_batch}, and the server "
                               f"forms batches of up to {max_batch} (--max-batch-size)")
        bundle.open_text()
        unit = {t.role: np.full((1, *t.out_shape), t.out_shape[-1] ** -0.5, np.float32) for t in towers if t.out_shape}
        logits = bundle.scores(unit).logits
        if logits.shape != (1, len(bundle.classes.names)):
            return base.failed(f"the heads return {logits.shape}, not (1, {len(bundle.classes.names)})")
        tower_id = bundle.manifest.variant_id(choice.runtime, choice.precision)
    except Exception as exc:  # noqa: BLE001 - an untrusted bundle may fail in any library; it must not stop others
        return base.failed(f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    return replace(base, state="ready", bundle=bundle, towers=towers, tower_id=tower_id)


def tower_specs(bundle: Bundle, path: Path, runtime: str, precision: str, device: str) -> tuple[TowerSpec, ...]:
    """One TowerSpec per tower role, in running order, keyed by its computation (Manifest.tower_keys); a role the
    heads do not read (MMRL's trunk) returns nothing to the engine."""
    m = bundle.manifest
    keys, shapes = m.tower_keys(runtime, precision), bundle.feature_shapes()
    specs = []
    for role, key in keys.items():
        source = m.towers[role].input
        if source is not None and m.towers[source].input is not None:
            raise BundleError(f"tower role {role} reads {source}, which reads another role: the server runs roles "
                              f"that read pixels or a role that does")
        specs.append(TowerSpec(key, path, m, runtime, precision, device, role, keys[source] if source else None,
                               shapes.get(role, ())))
    return tuple(specs)


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

    def records(self) -> list[ModelRecord]:
        return [c.record(self.defaults.get(c.name) is c) for c in self.classifiers.values()]

    def towers(self) -> dict[str, Classifier]:
        """One ready classifier per open tower (the first by name): what each tower serves."""
        out: dict[str, Classifier] = {}
        for c in self.ready:
            for t in c.towers:
                out.setdefault(t.tower_id, c)
        return out

    def _versions(self, name: str) -> list[Classifier]:
        return [c for (n, _), c in self.classifiers.items() if n == name]

    def one(self, ref: str) -> Classifier:
        """"NAME" (its default version) or "NAME@VERSION" → a ready classifier, else a 404 or 503 naming why."""
        name, version = split_ref(ref)
        versions = self._versions(name)
        if not versions:
            self._check_any()
            raise ApiError(404, f"no classifier named {name!r}; the repository has: {', '.join(self.names)} "
                                f"(GET /models)")
        if version is not None:
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
        if models == [ALL_MODELS]:
            self._check_any()
            chosen = sorted(self.defaults.values(), key=lambda c: c.name)
            if not chosen:
                raise retry_later("no classifier is ready (GET /models has the reasons)")
        else:
            chosen = [self.one(ref) for ref in models]
        if len(chosen) > limit:
            raise ApiError(400, f"the request names {len(chosen)} classifiers; at most {limit} (FVGPT_MAX_MODELS)")
        return chosen

    def _check_any(self) -> None:
        if not self.names:
            if not self.scanned:
                raise retry_later("the model repository is still loading; retry shortly")
            raise ApiError(404, "the model repository holds no classifiers yet")


def _servable(c: Classifier) -> Classifier:
    if c.ready:
        return c
    if c.state == "loading":
        raise retry_later(f"classifier {c.ref} is loading; retry shortly")
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
