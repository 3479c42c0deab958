"""A loaded bundle: its verified manifest, text tables and graphs, and the label routing of docs/method.md
("Inference"). Torch-free: ONNX Runtime runs the graphs (the tower also on OpenVINO or a TensorRT engine), NumPy does
the rest.

Routing: a label set made only of base classes goes to the base head (FDC, E6); any other set (new labels, mixed
labels, or the whole bundle when it holds new classes) to the new head (Prior Calibration, E9–E11) over exactly the
requested labels. Zero-shot bundles have one cosine head. Bundled classes take their text rows from the tables; other
labels go through the shared text graph once and are cached.

Graph sessions come from a SessionPool keyed by file content, so bundles on one backbone share their tower and text
graphs in a process. The text features of new labels are cached in one process-wide LabelCache with one bound for all
bundles, so a server holding a thousand bundles cannot grow a thousand caches.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from fvgpt.labels import prompts

from .explain import ExplainRunner
from .manifest import BundleError, Manifest, open_manifest
from .sessions import SESSIONS, SessionPool
from .tensorrt import TensorRTRunner, TensorRTUnavailable
from .tokenizer import ClipTokenizer, shared_tokenizer

LABEL_CACHE_SIZE = 16_384  # new-label rows kept per process, all bundles together (2·D floats each: 64 MB at D = 512)
RUNTIMES = ("onnx", "openvino", "tensorrt")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Scores:
    labels: list[str]
    head: str  # "base" | "new" | "zero-shot"
    logits: np.ndarray  # (B, C)

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)


class LabelCache:
    """LRU of the (learned, clip) text rows of labels that are not bundled classes, keyed by (the bundle's text
    identity, label), shared by every bundle of a process and bounded as a whole. Thread-safe."""

    def __init__(self, size: int = LABEL_CACHE_SIZE):
        self.size = size
        self._rows: OrderedDict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def rows(self, namespace: str, labels: list[str],
             encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rows of `labels` in order; the missing ones come from `encode(missing) -> (learned, clip)` in one call,
        outside the lock (two requests missing the same label at once may both encode it; neither waits)."""
        with self._lock:
            found = {lab: self._rows[(namespace, lab)] for lab in labels if (namespace, lab) in self._rows}
            for lab in found:
                self._rows.move_to_end((namespace, lab))
        if missing := [lab for lab in dict.fromkeys(labels) if lab not in found]:
            encoded = dict(zip(missing, zip(*encode(missing))))
            with self._lock:
                self._rows.update(((namespace, lab), row) for lab, row in encoded.items())
                while len(self._rows) > self.size:
                    self._rows.popitem(last=False)
            found |= encoded
        return [found[lab] for lab in labels]

    def __len__(self) -> int:
        return len(self._rows)


LABELS = LabelCache()  # the process-wide cache bundles use unless given another


class TowerRunner:
    """One tower graph on one runtime: its input (pixels (B, 3, S, S), or another role's output) → its output (image
    features (B, D) or (B, K, D), or a trunk's tokens)."""

    def __init__(self, path: Path, manifest: Manifest, precision: str, runtime: str = "onnx", device: str = "cpu",
                 threads: int | None = None, pool: SessionPool = SESSIONS, role: str = "image"):
        """The tower role of the (verified) bundle at `path`; a server's encoder opens it without the bundle's
        heads."""
        m = manifest
        if runtime not in RUNTIMES:
            raise BundleError(f"unknown runtime {runtime!r} ({', '.join(RUNTIMES)})")
        graph = m.tower_graph(role, runtime, precision)
        self.precision, self.runtime, self.tower_id, self.role = precision, runtime, graph.id, role
        if runtime == "tensorrt":
            engines = (m.tensorrt or {}).get(role, {})
            if precision not in engines:
                raise TensorRTUnavailable(f"the bundle has no {precision} TensorRT engine (has: "
                                          f"{', '.join(engines) or 'none'}); export with --tensorrt on a GPU host")
            engine = TensorRTRunner(path / engines[precision]["file"])
            self._run = lambda pixels: engine.run(pixels)["features"]
            self.provider = "TensorRT"
        elif runtime == "openvino":
            self._run = pool.openvino(path / graph.file, m.files[graph.file], precision, threads).run
            self.provider = "OpenVINO CPU"
        else:
            session, self.provider = pool.get(path / graph.file, m.files[graph.file], device, threads)
            source, result = session.get_inputs()[0].name, session.get_outputs()[0].name
            self._run = lambda x: session.run([result], {source: x})[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run(np.ascontiguousarray(x, dtype=np.float32))


class TowerSet:
    """Every tower role of a bundle on one runtime × precision, each run once per call in the order the roles read
    each other (MMRL: its trunk, then CLIP's branch and its own): pixels → {role: output} for the roles the heads
    read."""

    def __init__(self, path: Path, manifest: Manifest, precision: str, runtime: str = "onnx", device: str = "cpu",
                 threads: int | None = None, pool: SessionPool = SESSIONS):
        self.runners = {role: TowerRunner(path, manifest, precision, runtime, device, threads, pool, role)
                        for role in manifest.roles()}
        self.inputs = {role: manifest.towers[role].input for role in self.runners}
        self.outputs = sorted(set(manifest.heads.features.values()))
        self.precision, self.runtime = precision, runtime
        self.tower_id = manifest.variant_id(runtime, precision)
        self.provider = next(iter(self.runners.values())).provider

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for role, runner in self.runners.items():
            out[role] = runner(pixels if self.inputs[role] is None else out[self.inputs[role]])
        return {role: out[role] for role in self.outputs}


class Bundle:
    """Heads, text graph and tables are loaded at once (small); towers on request (`tower`), since a process that
    only routes labels (serving's API process) never runs one."""

    def __init__(self, path: str | Path, verify: bool = True, threads: int | None = 1,
                 pool: SessionPool = SESSIONS, labels: LabelCache = LABELS):
        from safetensors.numpy import load_file

        self.path = Path(path)
        self.manifest: Manifest = open_manifest(self.path, verify)
        self.classes = self.manifest.classes
        self.pool = pool
        self.threads = threads
        try:
            self.tables: dict[str, np.ndarray] = load_file(str(self.path / self.manifest.tables))
        except Exception as exc:  # noqa: BLE001 - safetensors' own errors do not say which file
            raise BundleError(f"{self.path / self.manifest.tables} cannot be read ({type(exc).__name__}: {exc})") \
                from None
        heads = self.manifest.heads.file
        self._heads, _ = pool.get(self.path / heads, self.manifest.files[heads], "cpu", threads)
        self._labels = labels
        # the text graph and the learned context fix a label's rows: bundles sharing both share cache entries
        files = self.manifest.files
        learned = self.manifest.learned_text
        self._label_namespace = (files[self.manifest.text.file] + (files[learned.file] if learned else "")
                                 + (files[self.manifest.tables] if self.kind == "fvgpt" else
                                    self.manifest.prompts.template))

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def preprocess(self):
        return self.manifest.preprocess

    @property
    def max_batch(self) -> int:
        return self.manifest.max_batch

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tower role → the per-image shape of the features the heads read from it ((D,), or MMRL's (2, D))."""
        inputs = {i.name: i.shape for i in self._heads.get_inputs()}
        return {role: tuple(int(d) for d in inputs[name][1:]) for name, role in self.manifest.heads.features.items()}

    # ---- image side -------------------------------------------------------------------------------------------
    def tower(self, precision: str | None = None, runtime: str = "onnx", device: str = "cpu",
              threads: int | None = None) -> TowerRunner:
        """The image tower of a one-tower bundle (CoOp, KgCoOp, zero-shot): pixels → features."""
        if len(self.manifest.towers) > 1:
            raise BundleError(f"{self.path} has the tower roles {', '.join(self.manifest.roles())}: run them with "
                              f"Bundle.towers()")
        return TowerRunner(self.path, self.manifest, precision or self.manifest.default_precision, runtime, device,
                           threads, self.pool)

    def towers(self, precision: str | None = None, runtime: str = "onnx", device: str = "cpu",
               threads: int | None = None) -> TowerSet:
        """Every tower role on one runtime × precision: pixels → {role: output}, what `scores` takes."""
        return TowerSet(self.path, self.manifest, precision or self.manifest.default_precision, runtime, device,
                        threads, self.pool)

    def explainer(self, precision: str | None = None, threads: int | None = None) -> ExplainRunner:
        """The explain graph (at `precision`, else fp32); a BundleError when the bundle has none."""
        return ExplainRunner(self.path, self.manifest, precision or self.manifest.default_precision, threads,
                             self.pool)

    def classify(self, pixels: np.ndarray, labels: list[str] | None = None, precision: str | None = None) -> Scores:
        """Towers + heads in one call (validation, benchmarks, tests); serving splits the two across processes."""
        return self.scores(self.towers(precision)(pixels), labels)

    # ---- text side --------------------------------------------------------------------------------------------
    def open_text(self) -> None:
        """Load the tokenizer and the text graph(s) now rather than at the first new label: a server does, so a
        bundle it loaded keeps working after its folder is replaced or removed."""
        self.tokenizer, self._text  # noqa: B018 - cached on first access
        if self.manifest.learned_text is not None:
            self._learned_text  # noqa: B018

    @cached_property
    def tokenizer(self) -> ClipTokenizer:
        t = self.manifest.tokenizer
        return shared_tokenizer(self.path / t.vocab, t.context_length)

    @cached_property
    def _text(self) -> Any:
        """The text graph's session, held by the bundle from its first use (the pool holds sessions weakly)."""
        text = self.manifest.text.file
        return self.pool.get(self.path / text, self.manifest.files[text], "cpu", self.threads)[0]

    @cached_property
    def _learned_text(self) -> Any:
        """The learner's own text graph (PromptSRC, MMRL), held like `_text`."""
        text = self.manifest.learned_text.file
        return self.pool.get(self.path / text, self.manifest.files[text], "cpu", self.threads)[0]

    def encode_text(self, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(learned, clip) text features through the text graph: the learned prompt with the bundle's context, and
        the zero-shot template (zero-shot bundles: the template for both)."""
        p = self.manifest.prompts
        session = self._text
        template = prompts(labels, p.template)
        if self.kind != "fvgpt":
            feed = {"token_ids": self.tokenizer(template), "context": self.tables["context"],
                    "use_context": np.zeros(len(labels), np.float32)}
            clip = session.run(["text_features"], feed)[0]
            return clip, clip
        if self.manifest.learned_text is not None:  # the learner's graph; its prompts are tables of the bundle
            feed = {"token_ids": self.tokenizer(template), "context": self.tables["context"],
                    "use_context": np.zeros(len(labels), np.float32)}
            clip = session.run(["text_features"], feed)[0]
            learned_session = self._learned_text
            feed = {i.name: self.tables[i.name] for i in learned_session.get_inputs() if i.name != "token_ids"}
            feed["token_ids"] = self.tokenizer(prompts(labels, p.learned))
            return learned_session.run(["text_features"], feed)[0], clip
        feed = {"token_ids": self.tokenizer(prompts(labels, p.learned) + template), "context": self.tables["context"],
                "use_context": np.array([1.0] * len(labels) + [0.0] * len(labels), np.float32)}
        feats = session.run(["text_features"], feed)[0]
        return feats[:len(labels)], feats[len(labels):]

    def label_features(self, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(learned, clip) rows: bundled classes from the tables, other labels through the text graph, cached."""
        ids = [self.classes.find(label) for label in labels]
        new = [lab for lab, i in zip(labels, ids) if i is None]
        cached = iter(self._labels.rows(self._label_namespace, new, self.encode_text) if new else [])
        rows = [(self.tables["learned"][i], self.tables["clip"][i]) if i is not None else next(cached) for i in ids]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def directions(self, labels: list[str], head: str) -> np.ndarray:
        """(len(labels), D): the text row each label is scored with by `head` (runtime/explain.py)."""
        learned, clip = self.label_features(labels)
        if head == "zero-shot":
            return clip
        if head == "base":
            return self.tables["adapted"][[self.classes.position[self.classes.find(lab)] for lab in labels]]
        return learned

    # ---- heads and routing ------------------------------------------------------------------------------------
    def head_for(self, labels: list[str] | None) -> str:
        return "zero-shot" if self.kind != "fvgpt" else self.classes.head_for(labels)

    def scores(self, features: np.ndarray | dict[str, np.ndarray], labels: list[str] | None = None) -> Scores:
        """Logits for the requested labels (None: every bundled class) from image features, routed to the right head.
        `features` is the image tower's output, or a dict tower role → output."""
        by_role = features if isinstance(features, dict) else {"image": features}
        feed = {name: np.ascontiguousarray(by_role[role], np.float32)
                for name, role in self.manifest.heads.features.items()}
        head = self.head_for(labels)
        chosen = list(self.classes.names) if labels is None else list(labels)
        learned, clip = self.label_features(chosen)
        if head == "zero-shot":
            return Scores(chosen, head, self._heads.run(["logits"], feed | {"clip": clip})[0])
        if head == "base":
            positions = [self.classes.position[self.classes.find(lab)] for lab in chosen]
            adapted, output = self.tables["adapted"][positions], "base_logits"
        else:
            adapted, output = self.tables["adapted"], "new_logits"
        logits = self._heads.run([output], feed | {"learned": learned, "clip": clip, "adapted": adapted})[0]
        return Scores(chosen, head, logits)
