"""`fvgpt export`: a run dir (or plain CLIP + labels) → a parity-gated bundle dir in format v2 (docs/bundle-format.md).

Everything is written into a temporary sibling folder and renamed into place only after every parity gate passed,
so a failed export leaves no bundle behind and an existing bundle is never half-overwritten.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

import fvgpt
from fvgpt.backbone import load_backbone
from fvgpt.classes import ClassSplit
from fvgpt.config import weights_source
from fvgpt.errors import FVGPTError
from fvgpt.labels import ZERO_SHOT_TEMPLATE, learned_template
from fvgpt.model import FVGPTModel, TextTables
from fvgpt.rundir import load_run, read_json
from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import (MANIFEST, TOWER_RUNTIMES, BackboneInfo, Graph, Heads, Manifest, Prompts, Tokenizer,
                                    Tower, TowerGraph, sha256_file, short_id)
from fvgpt_runtime.tokenizer import VOCAB_FILE

from .graphs import TRACE_BATCH, CosineHeadsGraph, FVGPTHeadsGraph, TextGraph, export_graph
from .parity import (PARITY_REFERENCE, calibration_pixels, check_bundle, check_variant, gate, parity_pixels,
                     run_in_batches)
from .precision import convert_fp16, quantize_int8, quantize_openvino_int8
from .tensorrt_build import ENGINE_DIR, build_engine

TABLES = "tables.safetensors"
TEXT_GRAPH = "text.onnx"
HEADS_GRAPH = "heads.onnx"
VOCAB = f"tokenizer/{VOCAB_FILE}"
# tower files other than tower.<precision>.onnx: OpenVINO runs the ONNX fp32 graph at fp32 and bf16, its int8 is an IR
TOWER_FILES = {("openvino", "fp32"): ("tower.fp32.onnx", None), ("openvino", "bf16"): ("tower.fp32.onnx", None),
               ("openvino", "int8"): ("tower.openvino-int8.xml", "tower.openvino-int8.bin")}


class ExportError(FVGPTError):
    pass


@dataclass
class ExportOptions:
    precision: str = "fp32"
    max_batch: int = 64
    opset: int = 23
    tensorrt: bool = False
    openvino: bool = False
    force: bool = False
    parity_images: int = 96
    calibration_images: int = 64
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision == "bf16":
            raise ExportError("--precision bf16 is not offered for ONNX Runtime: its CPU provider has no bf16 MatMul "
                              "kernel (a bf16 graph does not load). Add --openvino: OpenVINO's bf16 variant is "
                              "written where this CPU has bf16 instructions, and `fvgpt tune` picks it if it is the "
                              "fastest")
        if self.precision not in TOWER_RUNTIMES["onnx"]:
            raise ExportError(f"--precision must be one of {', '.join(TOWER_RUNTIMES['onnx'])}, "
                              f"got {self.precision!r}")
        if not 1 <= self.max_batch <= 4096:
            raise ExportError("--max-batch must be in 1..4096")
        if self.openvino and not all(importlib.util.find_spec(m) for m in ("openvino", "nncf")):
            raise ExportError("--openvino needs OpenVINO and NNCF: pip install '.[openvino]'")


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


@torch.no_grad()
def _reference(model: FVGPTModel, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The torch model's outputs on the parity set, through the model object's own heads."""
    tables = model.tables(list(model.classes.names))
    return run_in_batches(lambda x: heads_reference(model, model.encode_image(torch.from_numpy(x)), tables), pixels)


@torch.no_grad()
def heads_reference(model: FVGPTModel, features: torch.Tensor, tables: TextTables) -> dict[str, np.ndarray]:
    """Features and the logits every bundle output must reproduce, from the model object's own heads."""
    if model.plugin is None:
        return {"features": features.numpy(), "logits": model.heads(features, tables).z_clip.numpy()}
    base = model.heads(features, tables.rows(model.classes.base_ids))
    return {"features": features.numpy(), "base_logits": base.z_fdc.numpy(),
            "new_logits": model.heads(features, tables).z_pc.numpy()}


def bundle_tables(model: FVGPTModel, tables: TextTables | None = None) -> dict[str, np.ndarray]:
    """learned, clip (C, D); adapted (C_base, D) = G̃ of the base classes; context (n_ctx, W), or one zero row for
    zero-shot bundles (the text graph ignores it where use_context = 0). `tables`: the model's, if already computed."""
    with torch.no_grad():
        tables = tables or model.tables(list(model.classes.names))
        arrays = {"learned": tables.learned, "clip": tables.clip}
        if model.plugin is not None:
            arrays["adapted"] = model.adapted_text(tables.learned[model.classes.base_ids])
            arrays["context"] = model.context
        else:
            arrays["context"] = torch.zeros(1, model.backbone.text.token_embedding.weight.shape[1])
    return {k: v.detach().cpu().float().numpy() for k, v in arrays.items()}


def _export_graphs(tmp: Path, model: FVGPTModel, opts: ExportOptions) -> list[str]:
    """tower.fp32.onnx, text.onnx and heads.onnx; returns the heads' output names."""
    bb = model.backbone
    size, dim = bb.preprocess.size, bb.embed_dim
    with _timed(opts, "tower graph (fp32)"):
        export_graph(model.tower, {"pixels": torch.randn(TRACE_BATCH, 3, size, size)}, tmp / "tower.fp32.onnx",
                     ["features"], {"pixels": {0: "batch"}}, opts.opset, {"batch": opts.max_batch})
    with _timed(opts, "text graph"):
        width = bb.text.token_embedding.weight.shape[1]
        example = {"token_ids": bb.tokenize(["X X a cat.", "a photo of a dog."]), "context": torch.randn(2, width),
                   "use_context": torch.tensor([1.0, 0.0])}
        export_graph(TextGraph(model), example, tmp / TEXT_GRAPH, ["text_features"],
                     {"token_ids": {0: "texts"}, "use_context": {0: "texts"}, "context": {0: "n_ctx"}}, opts.opset,
                     {"n_ctx": bb.context_length - 2})
    with _timed(opts, "heads graph"):
        rows = torch.nn.functional.normalize(torch.randn(3, dim), dim=-1)
        features = {"features": torch.nn.functional.normalize(torch.randn(TRACE_BATCH, dim), dim=-1)}
        if model.plugin is None:
            graph, outputs = CosineHeadsGraph(model), ["logits"]
            example, dynamic = features | {"clip": rows}, {"clip": {0: "labels"}}
        else:
            graph, outputs = FVGPTHeadsGraph(model), ["base_logits", "new_logits"]
            example = features | {"learned": rows, "clip": rows.flip(0), "adapted": rows[:2]}
            dynamic = {"learned": {0: "labels"}, "clip": {0: "labels"}, "adapted": {0: "base_labels"}}
        export_graph(graph.eval(), example, tmp / HEADS_GRAPH, outputs, {"features": {0: "batch"}} | dynamic,
                     opts.opset, {})
    return outputs


def model_id_of(kind: str, backbone: str, bundle_dir: Path) -> str:
    """A bundle's model id: its kind, backbone and the content of what makes it this classifier (heads, tables)."""
    identity = hashlib.sha256((sha256_file(bundle_dir / HEADS_GRAPH) + sha256_file(bundle_dir / TABLES)).encode())
    return f"{kind}-{backbone}-{identity.hexdigest()[:12]}"


def export_model(model: FVGPTModel, out: str | Path, opts: ExportOptions, pretrained: str, init_seed: int,
                 run: dict | None = None) -> Path:
    """Any model object (e.g. a generated one, for benchmarks) → a parity-gated bundle."""
    return _write_bundle(Path(out), opts, model, pretrained, init_seed, run)


def _write_bundle(out: Path, opts: ExportOptions, model: FVGPTModel, pretrained: str, init_seed: int,
                  run: dict | None) -> Path:
    bb = model.backbone
    fingerprint = bb.fingerprint()
    tmp = _prepare_out(out, opts.force)
    try:
        outputs = _export_graphs(tmp, model, opts)
        save_file(bundle_tables(model), str(tmp / TABLES))
        (tmp / VOCAB).parent.mkdir()
        shutil.copyfile(bb.vocabulary_path(), tmp / VOCAB)

        def tower_graph(runtime: str, precision: str) -> TowerGraph:
            facts = {"graph": "clip-image-tower", "model": bb.name, "weights": fingerprint,
                     "preprocess": bb.preprocess.to_dict(), "precision": precision}
            if runtime != "onnx":  # ONNX Runtime's ids predate runtimes in the format and stay as they were
                facts["runtime"] = runtime
            file, weights = TOWER_FILES.get((runtime, precision), (f"tower.{precision}.onnx", None))
            return TowerGraph(file, short_id("tower", facts), runtime, precision, weights)

        fvgpt_kind = model.plugin is not None
        n_ctx = 0 if model.context is None else int(model.context.shape[0])
        manifest = Manifest(
            kind="fvgpt" if fvgpt_kind else "zero-shot",
            model_id=model_id_of("fvgpt" if fvgpt_kind else "zero-shot", bb.name, tmp),
            backbone=BackboneInfo(bb.name, pretrained, init_seed, fingerprint, bb.embed_dim, bb.context_length,
                                  bb.logit_scale),
            preprocess=bb.preprocess, tokenizer=Tokenizer(VOCAB, bb.context_length), classes=model.classes,
            prompts=Prompts(n_ctx, learned_template(n_ctx) if fvgpt_kind else None, ZERO_SHOT_TEMPLATE),
            towers={"image": Tower({"onnx-fp32": tower_graph("onnx", "fp32")})}, default_precision="fp32",
            text=Graph(TEXT_GRAPH, short_id("text", {"graph": "clip-text", "model": bb.name, "weights": fingerprint,
                                                     "context_length": bb.context_length})),
            heads=Heads(HEADS_GRAPH, {"features": "image"}, outputs, model.plugin.tau if fvgpt_kind else None),
            tables=TABLES, max_batch=opts.max_batch, opset=opts.opset,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), fvgpt_version=fvgpt.__version__, run=run,
            files=dict.fromkeys(["tower.fp32.onnx", TEXT_GRAPH, HEADS_GRAPH, TABLES, VOCAB, PARITY_REFERENCE]))
        with _timed(opts, "parity: fp32 graphs vs torch"):
            pixels = parity_pixels(bb.preprocess, opts.parity_images)
            reference = _reference(model, pixels)
            save_file(reference, str(tmp / PARITY_REFERENCE))  # lets `fvgpt validate` re-check without torch
            manifest.write(tmp)
            engines = {"onnx": ["fp32"]}
            reports = check_bundle(tmp, pixels, reference, engines)
            gate(reports)
        variants = _Variants(tmp, manifest, opts, pixels, reference, reports, engines)
        if opts.precision != "fp32":
            convert = quantize_int8 if opts.precision == "int8" else convert_fp16
            variants.add(tower_graph("onnx", opts.precision),
                         lambda g: convert(tmp / "tower.fp32.onnx", tmp / g.file), required=True)
            manifest.default_precision = opts.precision
        if opts.openvino:
            _openvino_variants(variants, tower_graph, bb.preprocess, tmp)
        if opts.tensorrt:
            manifest.tensorrt = _tensorrt(tmp, manifest, opts, pixels, reference, reports)
        manifest.parity = {"images": int(len(pixels)), "generated_images": opts.parity_images,
                           "reference": PARITY_REFERENCE, "engines": engines, "checks": reports,
                           "refused": variants.refused}
        manifest.write(tmp)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    agreement = ", ".join(f"{k} top-1 {min(f['agreement'] for f in v['flips'].values()):.1%} (near-ties apart)"
                          for k, v in reports.items() if k.startswith("end_to_end") and v.get("flips"))
    _say(opts, f"bundle written to {out} (tower {manifest.tower_id}, default precision {opts.precision}; "
               f"{agreement})")
    return out


class _Variants:
    """Adds tower variants to a bundle under construction, each only after its parity checks passed."""

    def __init__(self, tmp: Path, manifest: Manifest, opts: ExportOptions, pixels: np.ndarray,
                 reference: dict[str, np.ndarray], reports: dict, engines: dict[str, list[str]]):
        self.tmp, self.manifest, self.opts, self.pixels, self.reference = tmp, manifest, opts, pixels, reference
        self.reports, self.engines = reports, engines
        self.refused: dict[str, dict] = {}  # variant key → the failing checks, for the record

    def add(self, graph: TowerGraph, make: Callable[[TowerGraph], None], required: bool) -> None:
        """Write the variant's files, gate it, keep it if it passes. A required variant that fails fails the export;
        an optional one is left out (files deleted) and recorded in `refused`."""
        tower = self.manifest.towers["image"].variants
        with _timed(self.opts, f"{graph.key} tower graph"):
            make(graph)
        tower[graph.key] = graph
        self.manifest.files |= dict.fromkeys(graph.files)
        self.manifest.write(self.tmp)
        with _timed(self.opts, f"parity: {graph.key} tower vs torch"):
            checks = check_variant(Bundle(self.tmp, verify=False), graph.runtime, graph.precision, self.pixels,
                                   self.reference)
        if required or all(c["passed"] for c in checks.values()):
            self.reports |= checks
            gate(self.reports)
            self.engines.setdefault(graph.runtime, []).append(graph.precision)
            return
        del tower[graph.key]
        shared = {f for g in tower.values() for f in g.files}
        for name in set(graph.files) - shared:
            del self.manifest.files[name]
            (self.tmp / name).unlink()
        self.manifest.write(self.tmp)
        self.refused[graph.key] = {k: c["failures"] for k, c in checks.items() if not c["passed"]}
        _say(self.opts, f"  {graph.key} refused by the parity gate, not written: {self.refused[graph.key]}")


def _openvino_variants(variants: _Variants, tower_graph: Callable[[str, str], TowerGraph], pre, tmp: Path) -> None:
    """OpenVINO fp32 and bf16 (compile settings on the ONNX fp32 graph; bf16 only where this CPU can run it, else
    it could not be gated here) and NNCF int8 (an IR calibrated on images drawn like the parity set)."""
    from fvgpt_runtime.openvino import unsupported

    def make_int8(graph: TowerGraph) -> None:
        calibration = calibration_pixels(pre, variants.opts.calibration_images)
        quantize_openvino_int8(tmp / "tower.fp32.onnx", tmp / graph.file, calibration)

    for precision in TOWER_RUNTIMES["openvino"]:
        if reason := unsupported(precision):
            _say(variants.opts, f"  openvino-{precision} not written: {reason}")
            continue
        variants.add(tower_graph("openvino", precision), make_int8 if precision == "int8" else lambda g: None,
                     required=False)


def _tensorrt(tmp: Path, manifest: Manifest, opts: ExportOptions, pixels: np.ndarray,
              reference: dict[str, np.ndarray], reports: dict) -> dict:
    """An engine built from the bundle's ONNX tower of the chosen precision; gated like the ONNX graphs."""
    name, cache = f"{ENGINE_DIR}/tower.{opts.precision}.plan", f"{ENGINE_DIR}/timing.cache"
    with _timed(opts, f"TensorRT {opts.precision} engine"):
        source = tmp / manifest.image_tower("onnx", opts.precision).file
        build = build_engine(source, tmp / name, manifest.preprocess.size, opts.max_batch, tmp / cache)
    manifest.tensorrt = {"image": {opts.precision: {"file": name, "build": build}}}
    manifest.files |= {name: None, cache: None}
    manifest.write(tmp)
    with _timed(opts, f"parity: TensorRT {opts.precision} engine vs torch"):
        reports |= check_bundle(tmp, pixels, reference, {"tensorrt": [opts.precision]})
        gate(reports)
    return manifest.tensorrt


def export_run(run_dir: str | Path, out: str | Path, opts: ExportOptions) -> Path:
    """Fuse a trained FVG-PT run (learned prompt + plugin) into a bundle."""
    _say(opts, f"exporting run {run_dir}")
    run = load_run(run_dir, require_plugin=True)
    cfg = run.config
    metrics = read_json(run.path / "metrics.json") if (run.path / "metrics.json").is_file() else None
    info = {"path": str(Path(run_dir).resolve()), "method": cfg.method, "shots": cfg.shots, "seed": cfg.seed,
            "metrics": metrics}
    return _write_bundle(Path(out), opts, run.model, cfg.pretrained, cfg.init_seed, info)


def export_zero_shot(model: str, pretrained: str, labels: list[str], out: str | Path, opts: ExportOptions,
                     init_seed: int = 0) -> Path:
    """Plain CLIP with the hand-crafted template: a cosine head, new labels through the text graph."""
    labels = [lab.strip() for lab in labels if lab.strip()]
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ExportError("--labels needs at least two distinct, non-empty labels")
    _say(opts, f"exporting zero-shot {model} ({pretrained}) with {len(labels)} labels")
    pretrained = weights_source(pretrained)  # the manifest names a checkpoint file by its absolute path
    backbone = load_backbone(model, pretrained, "cpu", init_seed)
    classes = ClassSplit(tuple(labels), (False,) * len(labels))
    return _write_bundle(Path(out), opts, FVGPTModel(backbone, classes).eval(), pretrained, init_seed, None)
