"""Bundle format v2 (docs/bundle-format.md): `manifest.json`, read, validated and written by one typed class.

The image side is split into **towers** (pixels → image features; CLIP's own depends only on the backbone, so every
bundle on one backbone carries a byte-identical one with the same `tower_id`) and per-bundle **heads** (image features
→ logits). A tower role may read another's output instead of pixels (MMRL: a trunk shared by CLIP's branch and its
own). The text graph takes the learned context as an input, so it too is shared per backbone (`text_id`).

Integrity: `files` maps every other file to its sha256, and `digest` is the sha256 of the manifest's own canonical
JSON without that field, so no byte of a bundle changes unnoticed.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from fvgpt.classes import ClassSplit, ClassSplitError
from fvgpt.errors import FVGPTError
from fvgpt.preprocess import Preprocess, PreprocessError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
KINDS = ("fvgpt", "zero-shot")
# The runtimes a tower graph is written for, and the precisions each offers (ONNX Runtime's CPU provider has no bf16
# MatMul; OpenVINO's fp16 is a GPU precision). TensorRT engines are built from the ONNX graphs and listed apart.
TOWER_RUNTIMES = {"onnx": ("fp32", "fp16", "int8"), "openvino": ("fp32", "bf16", "int8")}


class BundleError(FVGPTError):
    pass


class ManifestError(BundleError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FileDigests:
    """sha256 of files, remembered per file identity (device, inode, size, mtime, ctime): bundles hard-linked to one
    tower graph are read once per process, and any write to a file (which moves its ctime) makes it read again.
    As in git's index, a file changed in the last RACY_NS is not remembered: file times are coarser than writes."""

    RACY_NS = 2_000_000_000

    def __init__(self, size: int = 65_536):
        self.size = size
        self._known: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> str:
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            if (known := self._known.get(key)) is not None:
                return known
        digest = sha256_file(path)
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < self.RACY_NS:
            return digest
        with self._lock:
            self._known[key] = digest
            while len(self._known) > self.size:
                self._known.popitem(last=False)
        return digest


DIGESTS = FileDigests()


def short_id(prefix: str, facts: dict) -> str:
    """A stable id from the facts that determine a graph: prefix + 16 hex digits of their canonical JSON's sha256."""
    return f"{prefix}-{hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]}"


# ---- parsing helpers: every error names the field ---------------------------------------------------------------

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "a list"}


def _get(d: Any, key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    """d[key] checked against `kind`; `where` is the dotted path of d in the manifest ("" at the top)."""
    if not isinstance(d, dict):
        raise ManifestError(f"manifest field {where} must be an object")
    name = f"{where}.{key}" if where else key
    if key not in d or (optional and d[key] is None):
        if optional:
            return None
        raise ManifestError(f"manifest field {name} is missing")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ManifestError(f"manifest field {name} must be {' or '.join(_TYPE_NAMES[k] for k in kinds)}, "
                            f"not {type(value).__name__}")
    return value


OPTIONAL_FIELDS = ("input", "learned_text")  # written only when set: bundles without them read as before they existed


def _to_json(obj: Any) -> Any:
    if isinstance(obj, Preprocess):
        return obj.to_dict()
    if isinstance(obj, ClassSplit):
        return obj.records()
    if is_dataclass(obj):
        return {f.name: _to_json(getattr(obj, f.name)) for f in fields(obj)
                if not (f.name in OPTIONAL_FIELDS and getattr(obj, f.name) is None)}
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    return obj


# ---- the typed manifest -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackboneInfo:
    name: str
    pretrained: str
    init_seed: int
    fingerprint: str  # sha256 over every weight of the open_clip model
    embed_dim: int
    context_length: int
    logit_scale: float  # s: exp(logit_scale) of the model

    @classmethod
    def parse(cls, d: Any, where: str = "backbone") -> BackboneInfo:
        return cls(_get(d, "name", str, where), _get(d, "pretrained", str, where), _get(d, "init_seed", int, where),
                   _get(d, "fingerprint", str, where), _get(d, "embed_dim", int, where),
                   _get(d, "context_length", int, where), _get(d, "logit_scale", float, where))


@dataclass(frozen=True)
class Graph:
    """One ONNX graph file and the id of what it computes (bundles whose graphs share an id share the file's bytes)."""

    file: str
    id: str

    @classmethod
    def parse(cls, d: Any, where: str) -> Graph:
        return cls(_get(d, "file", str, where), _get(d, "id", str, where))


@dataclass(frozen=True)
class TowerGraph:
    """One tower variant: a graph file that one runtime runs at one precision. `id` is the tower_id: model, weights
    fingerprint, preprocessing, precision and (for runtimes other than ONNX Runtime) the runtime, nothing else.
    OpenVINO's fp32 and bf16 variants run the ONNX fp32 graph (the precision is a compile setting); its int8 variant is
    an OpenVINO IR whose weights file is `weights`."""

    file: str
    id: str
    runtime: str
    precision: str
    weights: str | None = None

    @property
    def key(self) -> str:
        return variant_key(self.runtime, self.precision)

    @property
    def files(self) -> list[str]:
        return [self.file] + ([self.weights] if self.weights else [])

    @classmethod
    def parse(cls, d: Any, where: str) -> TowerGraph:
        graph = cls(_get(d, "file", str, where), _get(d, "id", str, where), _get(d, "runtime", str, where),
                    _get(d, "precision", str, where), _get(d, "weights", str, where, optional=True))
        if graph.precision not in TOWER_RUNTIMES.get(graph.runtime, ()):
            raise ManifestError(f"manifest field {where} names {graph.runtime}/{graph.precision}; known: "
                                + ", ".join(variant_key(r, p) for r, ps in TOWER_RUNTIMES.items() for p in ps))
        return graph


def variant_key(runtime: str, precision: str) -> str:
    return f"{runtime}-{precision}"


@dataclass(frozen=True)
class Tower:
    """pixels (B, 3, S, S) → L2-normalised features (B, D) (or, for a trunk, tokens), one graph per runtime ×
    precision, keyed "onnx-int8", "openvino-bf16", ... `input`: the role whose output the graphs read instead of
    pixels (a branch after a trunk), None for pixels. `explain` (optional, `fvgpt export --explain`, one-tower
    bundles): graphs keyed the same way that also output each patch's term of the features (B, P, D) for heatmaps
    (docs/bundle-format.md, "Explain graphs"); ONNX Runtime only. A server runs them for POST /explain, never for
    /classify."""

    variants: dict[str, TowerGraph]
    input: str | None = None
    explain: dict[str, TowerGraph] = field(default_factory=dict)

    def find(self, runtime: str, precision: str) -> TowerGraph | None:
        """The variant runtime × precision runs; a TensorRT engine runs (is built from) the ONNX graph of its
        precision."""
        return self.variants.get(variant_key("onnx" if runtime == "tensorrt" else runtime, precision))

    def precisions(self, runtime: str) -> list[str]:
        return [g.precision for g in self.variants.values() if g.runtime == runtime]

    @classmethod
    def parse(cls, d: Any, where: str) -> Tower:
        raw = _get(d, "variants", dict, where)
        if not raw:
            raise ManifestError(f"manifest field {where}.variants is empty")
        variants = {k: TowerGraph.parse(g, f"{where}.variants.{k}") for k, g in raw.items()}
        explain = {k: TowerGraph.parse(g, f"{where}.explain.{k}")
                   for k, g in (_get(d, "explain", dict, where, optional=True) or {}).items()}
        for part, graphs in (("variants", variants), ("explain", explain)):
            if bad := [k for k, g in graphs.items() if k != g.key]:
                raise ManifestError(f"manifest field {where}.{part} has key(s) {bad} that do not match their "
                                    f"runtime and precision")
        if bad := [k for k, g in explain.items() if g.runtime != "onnx"]:
            raise ManifestError(f"manifest field {where}.explain has {bad}: explain graphs run on ONNX Runtime only")
        return cls(variants, _get(d, "input", str, where, optional=True), explain)

    def all_graphs(self) -> list[TowerGraph]:
        return [*self.variants.values(), *self.explain.values()]


@dataclass(frozen=True)
class Heads:
    """Image features → logits, per bundle. fvgpt: inputs (features, learned, clip, adapted) → (base_logits over the
    adapted rows, new_logits = Prior Calibration over the learned/clip rows); zero-shot: (features, clip) → logits.
    `features` maps each image-feature input of the graph to the tower role that produces it."""

    file: str
    features: dict[str, str]
    outputs: list[str]
    tau: float | None  # τ of the BRG's statistics (fvgpt)

    @classmethod
    def parse(cls, d: Any, where: str = "heads") -> Heads:
        return cls(_get(d, "file", str, where), _get(d, "features", dict, where), _get(d, "outputs", list, where),
                   _get(d, "tau", float, where, optional=True))


@dataclass(frozen=True)
class Prompts:
    n_ctx: int
    learned: str | None  # "X X X X {}." (fvgpt) — the placeholders take the learned context
    template: str  # the zero-shot template

    @classmethod
    def parse(cls, d: Any, where: str = "prompts") -> Prompts:
        return cls(_get(d, "n_ctx", int, where), _get(d, "learned", str, where, optional=True),
                   _get(d, "template", str, where))


@dataclass(frozen=True)
class Tokenizer:
    vocab: str  # the BPE merges file inside the bundle
    context_length: int

    @classmethod
    def parse(cls, d: Any, where: str = "tokenizer") -> Tokenizer:
        return cls(_get(d, "vocab", str, where), _get(d, "context_length", int, where))


@dataclass
class Manifest:
    kind: str
    model_id: str
    backbone: BackboneInfo
    preprocess: Preprocess
    tokenizer: Tokenizer
    classes: ClassSplit
    prompts: Prompts
    towers: dict[str, Tower]  # role → tower; "image" is CLIP's own features (CoOp/KgCoOp bundles have no other)
    default_precision: str  # of the ONNX Runtime tower: what a server runs without a tuning profile or override
    text: Graph  # token ids + context → text features
    heads: Heads
    tables: str  # safetensors: learned, clip (C, D), adapted (C_base, D), context (n_ctx, W)
    max_batch: int
    opset: int
    created: str
    fvgpt_version: str
    parity: dict = field(default_factory=dict)  # the export's parity report
    run: dict | None = None  # the training run the bundle came from
    tensorrt: dict | None = None  # role → precision → {"file", "build"}
    files: dict[str, str] = field(default_factory=dict)  # every file but the manifest → sha256
    learned_text: Graph | None = None  # the learner's own text graph (PromptSRC, MMRL); None: `text` with the context
    schema_version: int = SCHEMA_VERSION

    @property
    def tower_id(self) -> str:
        """The default towers' id (variant_id at the default precision)."""
        return self.variant_id("onnx", self.default_precision)

    def roles(self) -> list[str]:
        """The tower roles in the order they run: each after the role it reads."""
        return _in_order(self.towers)

    def variant_id(self, runtime: str, precision: str) -> str:
        """The id of runtime × precision over every tower role: the graph's tower_id when the bundle has one role
        (ids as before roles existed), else an id of all the roles' ids."""
        graphs = {role: t.find(runtime, precision) for role, t in self.towers.items()}
        if missing := [r for r, g in graphs.items() if g is None]:
            raise BundleError(f"the bundle has no {variant_key(runtime, precision)} graph for tower(s) {missing}")
        if len(graphs) == 1:
            return next(iter(graphs.values())).id
        return short_id("towers", {role: g.id for role, g in graphs.items()})

    def tower_keys(self, runtime: str, precision: str) -> dict[str, str]:
        """Tower role → the key of the computation it is: its graph's id, and for a role that reads another role's
        output, "<" and that role's key (a graph is the same computation only on the same input). Bundles whose roles
        have one key share that computation: it runs once per image (SharedTowers, the server's tower pool)."""
        keys: dict[str, str] = {}
        for role in self.roles():
            source = self.towers[role].input
            keys[role] = self.tower_graph(role, runtime, precision).id + (f"<{keys[source]}" if source else "")
        return keys

    def image_tower(self, runtime: str, precision: str) -> TowerGraph:
        """The image tower's variant for runtime × precision, for a bundle whose features all come from it (one tower
        role); a BundleError lists the variants there are, or says the bundle has several roles."""
        if len(self.towers) > 1:
            raise BundleError(f"this {(self.run or {}).get('method', '')} bundle has the tower roles "
                              f"{', '.join(self.roles())}, not one image tower: run them with "
                              f"fvgpt_runtime.bundle.TowerSet or SharedTowers")
        return self.tower_graph("image", runtime, precision)

    def tower_graph(self, role: str, runtime: str, precision: str) -> TowerGraph:
        """A tower role's variant for runtime × precision; a BundleError lists the variants there are."""
        tower = self.towers[role]
        if (graph := tower.find(runtime, precision)) is None:
            raise BundleError(f"the bundle has no {variant_key(runtime, precision)} tower graph (has: "
                              f"{', '.join(tower.variants)})")
        return graph

    def explain_graph(self, precision: str) -> TowerGraph:
        """The image tower's explain graph at `precision`, or its fp32 one when there is none at that precision; a
        BundleError says what to do when the bundle has none."""
        explain = self.towers["image"].explain
        graph = explain.get(variant_key("onnx", precision)) or explain.get(variant_key("onnx", "fp32"))
        if graph is None:
            raise BundleError("the bundle has no explain graph; export it with `fvgpt export --explain`")
        return graph

    def to_dict(self) -> dict:
        return _to_json(self)

    @staticmethod
    def digest_of(doc: dict) -> str:
        canonical = json.dumps({k: v for k, v in doc.items() if k != "digest"}, sort_keys=True, ensure_ascii=True,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def write(self, bundle_dir: Path) -> None:
        """Hash every listed file, then write manifest.json with its own digest."""
        self.files = {name: DIGESTS(bundle_dir / name) for name in sorted(self.files)}
        doc = self.to_dict()
        doc["digest"] = self.digest_of(doc)
        (bundle_dir / MANIFEST).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def parse(cls, doc: Any) -> Manifest:
        if not isinstance(doc, dict):
            raise ManifestError(f"{MANIFEST} must hold a JSON object, not {type(doc).__name__}")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"bundle format {version or 1} is not supported by this version of fvgpt (it reads "
                                f"format {SCHEMA_VERSION}); re-export the bundle with `fvgpt export`")
        kind = _get(doc, "kind", str, "")
        if kind not in KINDS:
            raise ManifestError(f"manifest field kind is {kind!r}; expected one of {', '.join(KINDS)}")
        try:
            classes = ClassSplit.from_records(_get(doc, "classes", list, ""))
        except (ClassSplitError, KeyError, TypeError) as exc:
            raise ManifestError(f"manifest field classes is malformed ({exc})") from None
        try:
            preprocess = Preprocess.from_dict(_get(doc, "preprocess", dict, ""))
        except PreprocessError as exc:
            raise ManifestError(f"manifest field {exc}") from None
        towers = {role: Tower.parse(t, f"towers.{role}") for role, t in _get(doc, "towers", dict, "").items()}
        if "image" not in towers:
            raise ManifestError("manifest field towers.image is missing")
        m = cls(kind=kind, model_id=_get(doc, "model_id", str, ""),
                backbone=BackboneInfo.parse(_get(doc, "backbone", dict, "")), preprocess=preprocess,
                tokenizer=Tokenizer.parse(_get(doc, "tokenizer", dict, "")), classes=classes,
                prompts=Prompts.parse(_get(doc, "prompts", dict, "")), towers=towers,
                default_precision=_get(doc, "default_precision", str, ""),
                text=Graph.parse(_get(doc, "text", dict, ""), "text"),
                heads=Heads.parse(_get(doc, "heads", dict, "")), tables=_get(doc, "tables", str, ""),
                max_batch=_get(doc, "max_batch", int, ""), opset=_get(doc, "opset", int, ""),
                created=_get(doc, "created", str, ""),
                fvgpt_version=_get(doc, "fvgpt_version", str, ""),
                parity=_get(doc, "parity", dict, ""), run=_get(doc, "run", dict, "", optional=True),
                tensorrt=_get(doc, "tensorrt", dict, "", optional=True),
                files=_get(doc, "files", dict, ""),
                learned_text=Graph.parse(doc["learned_text"], "learned_text") if doc.get("learned_text") else None)
        m.check()
        return m

    def check(self) -> None:
        """Cross-field rules: every referenced file is listed (and so hashed), every feature input has a tower."""
        if self.towers["image"].find("onnx", self.default_precision) is None:
            raise ManifestError(f"manifest field default_precision {self.default_precision!r} has no ONNX tower "
                                f"graph (towers.image.variants: {', '.join(self.towers['image'].variants)})")
        referenced = [self.text.file, self.heads.file, self.tables, self.tokenizer.vocab]
        referenced += [self.learned_text.file] if self.learned_text else []
        referenced += [f for t in self.towers.values() for g in t.all_graphs() for f in g.files]
        if unlisted := [f for f in referenced if f not in self.files]:
            raise ManifestError(f"manifest field files does not list {unlisted}: they would not be verified")
        if bad := {i: r for i, r in self.heads.features.items() if r not in self.towers}:
            raise ManifestError(f"manifest field heads.features maps {bad} to tower roles that do not exist")
        if bad := {r: t.input for r, t in self.towers.items() if t.input is not None and t.input not in self.towers}:
            raise ManifestError(f"manifest field towers: {bad} read tower roles that do not exist")
        if len(_in_order(self.towers)) < len(self.towers):
            raise ManifestError("manifest field towers: the roles' inputs form a cycle")
        keys = {r: sorted(t.variants) for r, t in self.towers.items()}
        if len({tuple(k) for k in keys.values()}) > 1:
            raise ManifestError(f"manifest field towers: every role needs the same runtime × precision variants "
                                f"(has {keys})")
        if self.kind == "fvgpt" and (self.prompts.learned is None or self.heads.tau is None):
            raise ManifestError("manifest fields prompts.learned and heads.tau are required for an fvgpt bundle")
        if not 1 <= self.max_batch <= 4096:
            raise ManifestError(f"manifest field max_batch {self.max_batch} is outside 1..4096")

    @classmethod
    def read(cls, bundle_dir: str | Path) -> Manifest:
        path = Path(bundle_dir) / MANIFEST
        if not path.is_file():
            raise BundleError(f"{bundle_dir} is not a bundle: {MANIFEST} is missing")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path} is not valid JSON ({exc})") from None
        manifest = cls.parse(doc)
        if doc.get("digest") != cls.digest_of(doc):
            raise ManifestError(f"{path} was changed after export (its digest does not match its content); "
                                f"re-export the bundle")
        return manifest

    def verify_files(self, bundle_dir: str | Path, names: list[str] | None = None) -> list[str]:
        """Problems found comparing every listed file (or only `names`) with its sha256 (empty: all good)."""
        problems = []
        for name in self.files if names is None else names:
            f = Path(bundle_dir) / name
            if name not in self.files:
                problems.append(f"{name}: not listed in the manifest")
            elif not f.is_file():
                problems.append(f"{name}: missing")
            elif DIGESTS(f) != self.files[name]:
                problems.append(f"{name}: sha256 mismatch (file changed since export)")
        return problems


def _in_order(towers: dict[str, Tower]) -> list[str]:
    """The roles whose chain of inputs starts at pixels, each after the role it reads (a cycle's roles are left
    out)."""
    found: list[str] = []
    while more := [r for r, t in towers.items() if r not in found and (t.input is None or t.input in found)]:
        found += more
    return found


def open_manifest(bundle_dir: str | Path, verify: bool = True) -> Manifest:
    """Read, validate and (by default) verify a bundle: a BundleError names the first problem found."""
    manifest = Manifest.read(bundle_dir)
    if verify and (problems := manifest.verify_files(bundle_dir)):
        raise BundleError(f"{bundle_dir}: " + "; ".join(problems))
    return manifest
