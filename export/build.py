"""`fvgpt export`: a run dir (or plain CLIP + labels) → a parity-gated bundle dir.

Everything is written into a temporary sibling folder and renamed into place only after every parity gate passed,
so a failed export leaves no bundle behind and an existing bundle is never half-overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

import fvgpt
from fvgpt.backbone import Backbone, load_backbone
from fvgpt.classifier import CalibratedHead, CosineHead, FVGPTClassifier, TextTables, ZeroShotClassifier, text_tables
from fvgpt.errors import FVGPTError
from fvgpt.plugin import TAU
from fvgpt.prompts import ZERO_SHOT_TEMPLATE, learned_template
from fvgpt.rundir import load_run, read_json

from .bundle import MANIFEST, PARITY_REFERENCE, SCHEMA_VERSION, sha256_file
from .onnx_export import TRACE_BATCH, TextGraph, export_graph
from .parity import ParityError, check_image_graph, check_text_and_head, parity_set, parity_transform, run_in_batches
from .precision import PRECISIONS, convert_fp16, quantize_int8
from .tensorrt_engine import ENGINE_DIR, build_engine


class ExportError(FVGPTError):
    pass


@dataclass
class ExportOptions:
    precision: str = "fp32"
    max_batch: int = 64
    opset: int = 23
    tensorrt: bool = False
    force: bool = False
    parity_images: int = 96
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision == "bf16":
            raise ExportError("bf16 is not offered: ONNX Runtime's CPU provider has no bf16 MatMul kernel (a bf16 "
                              "graph does not load), and int8 measured faster than torch's own bf16 on an AVX-512 "
                              "BF16 CPU (ViT-B/16, batch 8: 6.2x vs 4.2x open_clip eager fp32); use int8 on CPUs, "
                              "fp16 on GPUs")
        if self.precision not in PRECISIONS:
            raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not 1 <= self.max_batch <= 4096:
            raise ExportError("--max-batch must be in 1..4096")


def _say(opts: ExportOptions, msg: str) -> None:
    if opts.progress:
        print(msg, flush=True)


@contextmanager
def _timed(opts: ExportOptions, what: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    _say(opts, f"  {what}: {time.perf_counter() - t0:.1f} s")


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists():
        if not force:
            raise ExportError(f"{out} already exists; pass --force to replace it")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise ExportError(f"{out} exists and is not a bundle; refusing to replace it even with --force")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    for f in tmp.rglob("*"):  # safetensors writes 0600; a bundle is meant to be copied and read by services
        f.chmod(0o755 if f.is_dir() else 0o644)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _torch_outputs(module: torch.nn.Module, pixels: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return run_in_batches(lambda x: dict(zip(names, (t.numpy() for t in module(torch.from_numpy(x))))), pixels)


def _gate(report: dict, what: str) -> dict:
    if not report["passed"]:
        raise ParityError(f"parity gate failed for {what}: " + "; ".join(report["failures"]) +
                          " — no bundle was written")
    return report


def _write_manifest(tmp: Path, manifest: dict) -> None:
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _write_bundle(out: Path, opts: ExportOptions, backbone: Backbone, classifier: torch.nn.Module,
                  outputs: list[str], text_graph: TextGraph, head: torch.nn.Module, head_inputs: list[str],
                  tables: TextTables, adapted_base: np.ndarray | None, manifest: dict) -> Path:
    tmp = _prepare_out(out, opts.force)
    try:
        size, dim = backbone.preprocess.size, backbone.embed_dim
        files = ["image.onnx", "text.onnx", "head.onnx", "tables.safetensors", PARITY_REFERENCE]
        with _timed(opts, "image graph (fp32)"):
            export_graph(classifier, {"pixels": torch.randn(TRACE_BATCH, 3, size, size)}, tmp / "image.onnx",
                         outputs, {"pixels": {0: "batch"}}, opts.opset, {"batch": opts.max_batch})
        with _timed(opts, "text graph"):
            example = {"token_ids": backbone.tokenize(["a photo of a cat.", "a photo of a dog."])}
            dynamic = {"token_ids": {0: "texts"}}
            if text_graph.has_context:
                example["use_context"] = torch.tensor([1.0, 0.0])
                dynamic["use_context"] = {0: "texts"}
            export_graph(text_graph, example, tmp / "text.onnx", ["text_features"], dynamic, opts.opset, {})
        with _timed(opts, "head graph"):
            rows = {"tuned": tables.tuned[:2], "clip": tables.clip[:2]}
            example = {"features": torch.nn.functional.normalize(torch.randn(TRACE_BATCH, dim), dim=-1)}
            export_graph(head, example | {k: rows[k] for k in head_inputs}, tmp / "head.onnx", ["logits"],
                         {"features": {0: "batch"}} | {k: {0: "labels"} for k in head_inputs}, opts.opset, {})
        arrays = {"tuned": tables.tuned.cpu().numpy(), "clip": tables.clip.cpu().numpy()}
        if adapted_base is not None:
            arrays["adapted_base"] = adapted_base
        save_file(arrays, str(tmp / "tables.safetensors"))
        manifest |= {
            "schema_version": SCHEMA_VERSION, "fvgpt_version": fvgpt.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "preprocess": backbone.preprocess.to_dict(),
            "tokenizer": {"type": "open_clip_simple", "context_length": backbone.context_length},
            "logit_scale": backbone.logit_scale, "gate_tau": TAU, "opset": opts.opset, "max_batch": opts.max_batch,
            "graphs": {"image": {"fp32": {"file": "image.onnx", "outputs": outputs}}, "text": {"file": "text.onnx"},
                       "head": {"file": "head.onnx", "inputs": head_inputs}},
            "tables": "tables.safetensors", "default_precision": "fp32", "tensorrt": None,
        }
        _write_manifest(tmp, manifest)

        with _timed(opts, "parity: fp32 image graph vs torch"):
            pixels = parity_set(parity_transform(manifest["preprocess"]), opts.parity_images)
            reference = _torch_outputs(classifier, pixels, outputs)
            save_file(reference, str(tmp / PARITY_REFERENCE))  # lets `fvgpt validate` re-check without torch
            parity = {"images": int(len(pixels)), "generated_images": opts.parity_images,
                      "reference": PARITY_REFERENCE,
                      "fp32": _gate(check_image_graph(tmp, "fp32", "onnx", pixels, reference), "the fp32 image graph")}
        with _timed(opts, "parity: text and head graphs"):
            for name, report in check_text_and_head(tmp, reference).items():
                parity[name] = _gate(report, f"the {name} graph")
        if opts.precision != "fp32":
            name = f"image.{opts.precision}.onnx"
            with _timed(opts, f"{opts.precision} image graph"):
                if opts.precision == "int8":
                    quantize_int8(tmp / "image.onnx", tmp / name)
                else:
                    convert_fp16(tmp / "image.onnx", tmp / name)
            files.append(name)
            manifest["graphs"]["image"][opts.precision] = {"file": name, "outputs": outputs}
            manifest["default_precision"] = opts.precision
            _write_manifest(tmp, manifest)
            with _timed(opts, f"parity: {opts.precision} image graph vs torch"):
                parity[opts.precision] = _gate(check_image_graph(tmp, opts.precision, "onnx", pixels, reference),
                                               f"the {opts.precision} image graph")
        if opts.tensorrt:
            manifest["tensorrt"] = _tensorrt(tmp, manifest, files, opts, size, pixels, reference, parity)
        manifest["parity"] = parity
        manifest["files"] = {name: sha256_file(tmp / name) for name in sorted(files)}
        manifest["model_id"] = f"{manifest['kind']}-{backbone.name}-{manifest['files']['image.onnx'][:12]}"
        _write_manifest(tmp, manifest)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    agreement = ", ".join(f"{k} top-1 agreement {min(v['top1_agreement'].values()):.1%}" for k, v in parity.items()
                          if isinstance(v, dict) and v.get("top1_agreement") and k != "head")
    _say(opts, f"bundle written to {out} (default precision {opts.precision}; {agreement})")
    return out


def _tensorrt(tmp: Path, manifest: dict, files: list[str], opts: ExportOptions, size: int, pixels: np.ndarray,
              reference: dict[str, np.ndarray], parity: dict) -> dict:
    """Engines built from the bundle's ONNX graph of the chosen precision; gated like the ONNX graphs."""
    name = f"{ENGINE_DIR}/image.{opts.precision}.plan"
    cache = f"{ENGINE_DIR}/timing.cache"
    with _timed(opts, f"TensorRT {opts.precision} engine"):
        source = tmp / manifest["graphs"]["image"][opts.precision]["file"]
        build = build_engine(source, tmp / name, size, opts.max_batch, tmp / cache)
    files += [name, cache]
    manifest["tensorrt"] = {"engines": {opts.precision: {"file": name}}, "build": build}
    _write_manifest(tmp, manifest)
    with _timed(opts, f"parity: TensorRT {opts.precision} engine vs torch"):
        parity[f"tensorrt_{opts.precision}"] = _gate(
            check_image_graph(tmp, opts.precision, "tensorrt", pixels, reference),
            f"the TensorRT {opts.precision} engine")
    return manifest["tensorrt"]


def export_run(run_dir: str | Path, out: str | Path, opts: ExportOptions) -> Path:
    """Fuse a trained FVG-PT run (prompt + plugin) into a bundle."""
    _say(opts, f"exporting run {run_dir}")
    run = load_run(run_dir, require_plugin=True)
    tables = text_tables(run.backbone, run.classnames, run.ctx)
    n_ctx = int(run.ctx.shape[0])
    classifier = FVGPTClassifier(run.backbone, run.plugin, tables, run.base_flags).eval()
    head = CalibratedHead(run.plugin, run.backbone.logit_scale).eval()
    metrics = read_json(run.path / "metrics.json") if (run.path / "metrics.json").is_file() else None
    manifest = {
        "kind": "fvgpt",
        "model": {"name": run.config.model, "pretrained": run.config.pretrained, "init_seed": run.config.init_seed,
                  "fingerprint": run.info["fingerprint"], "embed_dim": run.backbone.embed_dim},
        "run": {"path": str(Path(run_dir).resolve()), "method": run.config.method, "shots": run.config.shots,
                "seed": run.config.seed, "metrics": metrics},
        "classes": [{"name": c, "base": b} for c, b in zip(run.classnames, run.base_flags)],
        "prompts": {"n_ctx": n_ctx, "learned": learned_template(n_ctx), "template": ZERO_SHOT_TEMPLATE},
        "fdc_logit_scale": run.fdc_logit_scale,
    }
    return _write_bundle(Path(out), opts, run.backbone, classifier, ["features", "base_logits", "new_logits"],
                         TextGraph(run.backbone, run.ctx), head, ["tuned", "clip"], tables,
                         classifier.adapted_base.cpu().numpy(), manifest)


def export_zero_shot(model: str, pretrained: str, labels: list[str], out: str | Path, opts: ExportOptions,
                     init_seed: int = 0) -> Path:
    """Plain CLIP with the hand-crafted template: one head, new labels through the plain text graph."""
    labels = [lab.strip() for lab in labels if lab.strip()]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ExportError("--labels needs at least two distinct, non-empty labels")
    _say(opts, f"exporting zero-shot {model} ({pretrained}) with {len(labels)} labels")
    backbone = load_backbone(model, pretrained, "cpu", init_seed)
    tables = text_tables(backbone, labels, None)
    classifier = ZeroShotClassifier(backbone, tables).eval()
    manifest = {
        "kind": "zero-shot",
        "model": {"name": model, "pretrained": pretrained, "init_seed": init_seed,
                  "fingerprint": backbone.fingerprint(), "embed_dim": backbone.embed_dim},
        "classes": [{"name": c, "base": False} for c in labels],
        "prompts": {"n_ctx": 0, "template": ZERO_SHOT_TEMPLATE},
    }
    return _write_bundle(Path(out), opts, backbone, classifier, ["features", "logits"], TextGraph(backbone, None),
                         CosineHead(backbone.logit_scale).eval(), ["clip"], tables, None, manifest)
