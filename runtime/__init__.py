"""The bundle runtime: everything a process needs to serve or benchmark a bundle, and nothing that trains or exports.

It imports neither torch, open_clip nor the exporter (docs/architecture.md; tests/test_architecture.py blocks torch
and checks). Modules: manifest (bundle format v2, typed), preprocess (NumPy + PIL), tokenizer (CLIP BPE), sessions
(ONNX Runtime, shared per graph file), tensorrt (engines, GPU hosts), bundle (heads, text, label routing and caching).
"""
