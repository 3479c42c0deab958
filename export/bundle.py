"""The bundle contract (DESIGN.md, "The bundle dir") and its runtime, shared by validate, serving and benchmarks.

Torch-free on the hot path: ONNX Runtime (or a TensorRT engine) runs the graphs, NumPy does the rest. The open_clip
tokenizer is imported lazily, only when labels outside the bundle need text features.

Routing (DESIGN.md): a label set made only of base classes uses the base head (FDC); any other set — new labels,
mixed labels, or the whole bundle when it holds new classes — uses the new head (Prior Calibration) over exactly
the requested labels. Zero-shot bundles have one head.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fvgpt.errors import FVGPTError

from .preprocess import PreprocessConfig

MANIFEST = "manifest.json"
PARITY_REFERENCE = "parity_reference.safetensors"
SCHEMA_VERSION = 1
LABEL_CACHE_SIZE = 4096


class BundleError(FVGPTError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not a bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path / MANIFEST} is corrupt ({exc})") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{path}: bundle schema {manifest.get('schema_version')} is not {SCHEMA_VERSION}; "
                          f"re-export it with this version of fvgpt")
    return manifest


def verify_files(path: str | Path, manifest: dict) -> list[str]:
    """Problems found comparing every listed file with its sha256 (empty list: all good)."""
    problems = []
    for name, expected in manifest["files"].items():
        f = Path(path) / name
        if not f.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(f) != expected:
            problems.append(f"{name}: sha256 mismatch (file changed since export)")
    return problems


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def ort_session(path: Path, device: str = "cpu", threads: int | None = None):
    """An InferenceSession and the provider it really uses (onnxruntime-gpu lists CUDA even with no GPU)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    wanted = ["CPUExecutionProvider"]
    if device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), opts, providers=wanted)
    used = session.get_providers()[0]
    if device == "cuda" and used != "CUDAExecutionProvider":
        raise BundleError(f"CUDA was requested but ONNX Runtime runs {path.name} on {used} "
                          f"(onnxruntime-gpu installed? a GPU visible?)")
    return session, used


@dataclass
class Scores:
    labels: list[str]
    head: str  # "base" | "new" | "zero-shot"
    logits: np.ndarray  # (B, C)

    @property
    def probabilities(self) -> np.ndarray:
        return softmax(self.logits)


class Bundle:
    """A loaded bundle: the image graph (ONNX or TensorRT), the text and head graphs, and the text tables."""

    def __init__(self, path: str | Path, precision: str | None = None, runtime: str = "onnx", device: str = "auto",
                 threads: int | None = None, verify: bool = True, load_image: bool = True):
        """load_image=False skips the image graph: for a process that only routes labels (serving's API process)."""
        from safetensors.numpy import load_file

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if verify and (problems := verify_files(self.path, self.manifest)):
            raise BundleError(f"{self.path}: " + "; ".join(problems))
        m = self.manifest
        self.kind: str = m["kind"]
        self.classes: list[str] = [c["name"] for c in m["classes"]]
        self.base_flags: list[bool] = [bool(c["base"]) for c in m["classes"]]
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.preprocess = PreprocessConfig.from_manifest(m["preprocess"])
        self.precision = precision or m["default_precision"]
        graphs = m["graphs"]
        if self.precision not in graphs["image"]:
            raise BundleError(f"{self.path}: no {self.precision} image graph (has: {', '.join(graphs['image'])})")
        if runtime not in ("onnx", "tensorrt"):
            raise BundleError(f"unknown runtime {runtime!r} (onnx|tensorrt)")
        self.runtime = runtime
        self.provider = "none"  # until an image graph is loaded
        if load_image and runtime == "tensorrt":
            from .tensorrt_engine import TensorRTRunner, engine_for

            self._trt = TensorRTRunner(self.path / engine_for(m, self.precision))
            self.provider = "TensorRT"
        elif load_image:
            self._image, self.provider = ort_session(self.path / graphs["image"][self.precision]["file"], device,
                                                     threads)
        self._text, _ = ort_session(self.path / graphs["text"]["file"], device, threads)
        self._head, _ = ort_session(self.path / graphs["head"]["file"], device, threads)
        self.tables = load_file(str(self.path / m["tables"]))
        self.outputs: list[str] = graphs["image"][self.precision]["outputs"]
        self._label_cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_lock = threading.Lock()  # scores() may run in several threads at once
        self._tokenizer = None

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def max_batch(self) -> int:
        return int(self.manifest["max_batch"])

    # ---- image graph --------------------------------------------------------------------------------------------
    def run_image(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """(B,3,S,S) float32 → {"features", and "base_logits"/"new_logits" or "logits"}."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.runtime == "tensorrt":
            return self._trt.run(pixels)
        return dict(zip(self.outputs, self._image.run(self.outputs, {"pixels": pixels})))

    # ---- text graph ---------------------------------------------------------------------------------------------
    def _tokenize(self, texts: list[str]) -> np.ndarray:
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=int(self.manifest["tokenizer"]["context_length"]))
        return self._tokenizer(texts).numpy().astype(np.int64)

    def encode_text(self, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tuned, clip) text features through the text graph: "X X X X <label>." with the learned context, and the
        zero-shot template (zero-shot bundles: the template for both)."""
        p = self.manifest["prompts"]
        clean = [lab.replace("_", " ").strip() for lab in labels]  # fvgpt.prompts.clean_label, without torch
        template = [p["template"].format(c) for c in clean]
        if self.kind != "fvgpt":
            clip = self._text.run(["text_features"], {"token_ids": self._tokenize(template)})[0]
            return clip, clip
        learned = [p["learned"].format(c) for c in clean]
        feed = {"token_ids": self._tokenize(learned + template),
                "use_context": np.array([1.0] * len(labels) + [0.0] * len(labels), np.float32)}
        feats = self._text.run(["text_features"], feed)[0]
        return feats[:len(labels)], feats[len(labels):]

    def label_features(self, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tuned, clip) rows for labels: bundled classes from the tables, others through the text graph, cached."""
        with self._cache_lock:
            missing = [lab for lab in dict.fromkeys(labels)
                       if lab not in self.class_index and lab not in self._label_cache]
            if missing:
                tuned, clip = self.encode_text(missing)
                for i, lab in enumerate(missing):
                    self._label_cache[lab] = (tuned[i], clip[i])
            rows = []
            for lab in labels:
                if lab in self.class_index:
                    i = self.class_index[lab]
                    rows.append((self.tables["tuned"][i], self.tables["clip"][i]))
                else:
                    self._label_cache.move_to_end(lab)
                    rows.append(self._label_cache[lab])
            while len(self._label_cache) > LABEL_CACHE_SIZE:  # evict only after this request's rows are taken
                self._label_cache.popitem(last=False)
        return np.stack([t for t, _ in rows]), np.stack([c for _, c in rows])

    def run_head(self, features: np.ndarray, tuned: np.ndarray, clip: np.ndarray) -> np.ndarray:
        """Logits over an arbitrary label set: Prior Calibration (fvgpt) or the cosine head (zero-shot)."""
        feed = {"features": features, "clip": clip}
        if self.kind == "fvgpt":
            feed["tuned"] = tuned
        return self._head.run(["logits"], feed)[0]

    # ---- heads and routing --------------------------------------------------------------------------------------
    def head_for(self, labels: list[str] | None) -> str:
        if self.kind != "fvgpt":
            return "zero-shot"
        chosen = self.classes if labels is None else labels
        return "base" if all(lab in self.class_index and self.base_flags[self.class_index[lab]] for lab in chosen) \
            else "new"

    def scores(self, image_out: dict[str, np.ndarray], labels: list[str] | None = None) -> Scores:
        """Logits for the requested labels (None: every bundled class), routed to the right head."""
        head = self.head_for(labels)
        if head == "base":
            base = [c for c, b in zip(self.classes, self.base_flags) if b]
            cols = [base.index(lab) for lab in labels] if labels is not None else list(range(len(base)))
            return Scores(labels or base, head, image_out["base_logits"][:, cols])
        default = "new_logits" if head == "new" else "logits"
        if labels is None:
            return Scores(list(self.classes), head, image_out[default])
        if all(lab in self.class_index for lab in labels):
            cols = [self.class_index[lab] for lab in labels]
            if head == "zero-shot":
                return Scores(labels, head, image_out[default][:, cols])
        return Scores(labels, head, self.run_head(image_out["features"], *self.label_features(labels)))
