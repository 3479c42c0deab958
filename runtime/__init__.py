"""The bundle runtime: everything a process needs to serve, batch-classify or benchmark a bundle, and nothing that
trains or exports.

It imports neither torch, open_clip nor the exporter (docs/architecture.md; tests/test_architecture.py blocks torch
and checks). Modules: manifest (bundle format v2, typed), preprocess (NumPy + PIL), tokenizer (CLIP BPE), sessions
(ONNX Runtime, shared per graph file), tensorrt (engines, GPU hosts), bundle (heads, text, label routing and caching),
classifier (the Python API: `fvgpt_runtime.load(...).classify(...)`, docs/python-api.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .classifier import Classifier, Info, Result, load
    from .images import InputError
    from .ranking import Prediction

__all__ = ["Classifier", "Info", "InputError", "Prediction", "Result", "load"]
_HOME = {"load": "classifier", "Classifier": "classifier", "Result": "classifier", "Info": "classifier",
         "Prediction": "ranking", "InputError": "images"}


def __getattr__(name: str):
    """The API's names, imported at first use: `import fvgpt_runtime.manifest` stays light (no ONNX Runtime)."""
    if name not in _HOME:
        raise AttributeError(f"module 'fvgpt_runtime' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_HOME[name]}", __name__), name)
