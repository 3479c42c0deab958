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
from fvgpt.labels import ZERO_SHOT_TEMPLATE
from fvgpt.model import FVGPTModel, TextTables
from fvgpt.rundir import load_run, read_json
from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import (MANIFEST, TOWER_RUNTIMES, BackboneInfo, Graph, Heads, Manifest, Prompts, Tokenizer,
                                    Tower, TowerGraph, sha256_file, short_id)
from fvgpt_runtime.tokenizer import VOCAB_FILE

from .graphs import (TRACE_BATCH, ClipBranchGraph, CosineHeadsGraph, ExplainGraph, FVGPTHeadsGraph, MMRLBranchGraph,
                     MMRLTextGraph, OwnTowerHeadsGraph, PromptedTowerGraph, PromptSRCTextGraph, TextGraph, TrunkGraph,
                     export_graph)
from .parity import (PARITY_REFERENCE, calibration_pixels, check_bundle, check_explain, check_variant,
                     explain_reference, gate, parity_pixels, run_in_batches)
from .precision import convert_fp16, quantize_int8, quantize_openvino_int8
from .tensorrt_build import ENGINE_DIR, build_engine

TABLES = "tables.safetensors"
TEXT_GRAPH = "text.onnx"
HEADS_GRAPH = "heads.onnx"
VOCAB = f"tokenizer/{VOCAB_FILE}"


def tower_files(stem: str, runtime: str, precision: str) -> tuple[str, str | None]:
    """(file, weights file) of one tower graph: `<stem>.<precision>.onnx`; OpenVINO runs the ONNX fp32 graph at fp32
    and bf16, its int8 is an IR (`<stem>.openvino-int8.xml` + `.bin`)."""
    if runtime == "openvino":
        return (f"{stem}.fp32.onnx", None) if precision != "int8" else (f"{stem}.openvino-int8.xml",
                                                                        f"{stem}.openvino-int8.bin")
    return f"{stem}.{precision}.onnx", None


@dataclass
class Role:
    """One tower role of a bundle: its graph (a torch module), the file stem, the role it reads (None: pixels), and
    the facts its id is made of beside the backbone's (model, weights, preprocessing, precision, runtime)."""

    name: str
    stem: str
    module: torch.nn.Module
    input: str | None
    facts: dict
    output: str = "features"  # the graph's output name ("tokens" for a trunk)

    @property
    def input_name(self) -> str:
        return "pixels" if self.input is None else "tokens"


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' float32 bytes: the learned constants a graph bakes in."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def tower_roles(model: FVGPTModel) -> list[Role]:
    """The image side of a bundle: CLIP's own tower ("image", the same graph for every bundle on the backbone); for
    PromptSRC its prompted tower beside it ("promptsrc", this classifier's); for MMRL CLIP's tower split after the
    blocks it leaves untouched: a "trunk" shared by CLIP's branch ("image") and MMRL's ("mmrl", this classifier's)."""
    clip_tower = Role("image", "tower", model.tower, None, {"graph": "clip-image-tower"})
    if not model.own_tower:
        return [clip_tower]
    prompt = model.prompt
    if model.cfg.method == "promptsrc":
        return [clip_tower, Role("promptsrc", "promptsrc-tower", PromptedTowerGraph(model), None,
                                 {"graph": "promptsrc-tower", "prompts": tensor_digest(prompt.vision_ctx,
                                                                                       prompt.vision_deep)})]
    start = ClipBranchGraph(model).start
    return [Role("trunk", "trunk", TrunkGraph(model), None, {"graph": "clip-trunk", "blocks": start}, "tokens"),
            Role("image", "clip-branch", ClipBranchGraph(model), "trunk",
                 {"graph": "clip-branch", "from_block": start}),
            Role("mmrl", "mmrl-branch", MMRLBranchGraph(model), "trunk",
                 {"graph": "mmrl-branch", "from_block": start,
                  "prompts": tensor_digest(prompt.visual_tokens(), prompt.proj_rep)})]


class ExportError(FVGPTError):
    pass


@dataclass
class ExportOptions:
    precision: str = "fp32"
    max_batch: int = 64
    opset: int = 23
    tensorrt: bool = False
    openvino: bool = False
    explain: bool = False
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
    """Features (named as the heads graph's inputs) and the logits every bundle output must reproduce, from the model
    object's own heads. `features`: model.encode_image's."""
    if model.plugin is None:
        return {"features": features.numpy(), "logits": model.heads(features, tables).z_clip.numpy()}
    f_clip, tuned = model.split(features)
    base = model.heads(features, tables.rows(model.classes.base_ids))
    inputs = {"features": tuned.numpy(), "clip_features": f_clip.numpy()} if model.own_tower else \
        {"features": features.numpy()}
    return inputs | {"base_logits": base.z_fdc.numpy(), "new_logits": model.heads(features, tables).z_pc.numpy()}


def bundle_tables(model: FVGPTModel, tables: TextTables | None = None) -> dict[str, np.ndarray]:
    """learned, clip (C, D); adapted (C_base, D) = G̃ of the base classes; context (n_ctx, W), or one zero row for
    zero-shot bundles (the text graph ignores it where use_context = 0). `tables`: the model's, if already computed."""
    with torch.no_grad():
        tables = tables or model.tables(list(model.classes.names))
        arrays = {"learned": tables.learned, "clip": tables.clip}
        if model.plugin is not None:
            arrays["adapted"] = model.adapted_text(tables.learned[model.classes.base_ids])
        arrays["context"] = model.context if model.context is not None else \
            torch.zeros(1, model.backbone.text.token_embedding.weight.shape[1])
        arrays |= learned_text_inputs(model)
    return {k: v.detach().cpu().float().numpy() for k, v in arrays.items()}


def learned_text_inputs(model: FVGPTModel) -> dict[str, torch.Tensor]:
    """The learner's text prompts its own text graph takes as inputs (tables of the bundle): PromptSRC's deep
    prompts, MMRL's layers' tokens R_t."""
    if not model.own_tower:
        return {}
    if model.cfg.method == "promptsrc":
        return {"context": model.prompt.ctx, "text_deep": model.prompt.text_deep}
    return {"rep_text": model.prompt.text_tokens()}


def _export_graphs(tmp: Path, model: FVGPTModel, roles: list[Role], opts: ExportOptions) -> list[str]:
    """The fp32 tower graphs of every role, text.onnx (and the learner's text graph), heads.onnx; returns the heads'
    output names."""
    bb = model.backbone
    size, dim = bb.preprocess.size, bb.embed_dim
    examples = {None: torch.randn(TRACE_BATCH, 3, size, size)}
    for role in roles:
        with _timed(opts, f"{role.name} tower graph (fp32)"), torch.no_grad():
            example = examples[role.input]
            export_graph(role.module, {role.input_name: example}, tmp / f"{role.stem}.fp32.onnx", [role.output],
                         {role.input_name: {0: "batch"}}, opts.opset, {"batch": opts.max_batch})
            examples[role.name] = role.module(example)
    width = bb.text.token_embedding.weight.shape[1]
    with _timed(opts, "text graph"):
        example = {"token_ids": bb.tokenize(["X X a cat.", "a photo of a dog."]), "context": torch.randn(2, width),
                   "use_context": torch.tensor([1.0, 0.0])}
        export_graph(TextGraph(model), example, tmp / TEXT_GRAPH, ["text_features"],
                     {"token_ids": {0: "texts"}, "use_context": {0: "texts"}, "context": {0: "n_ctx"}}, opts.opset,
                     {"n_ctx": bb.context_length - 2})
    if (learned := learned_text_graph(model)) is not None:
        graph, file, _ = learned
        with _timed(opts, "the learner's text graph"):
            example = {"token_ids": bb.tokenize(["X X X X a cat.", "X X X X dog."])}
            example |= {k: v.detach() for k, v in learned_text_inputs(model).items()}
            export_graph(graph, example, tmp / file, ["text_features"], {"token_ids": {0: "texts"}}, opts.opset, {})
    with _timed(opts, "heads graph"):
        rows = torch.nn.functional.normalize(torch.randn(3, dim), dim=-1)
        features = {"features": torch.nn.functional.normalize(torch.randn(TRACE_BATCH, dim), dim=-1)}
        if model.plugin is None:
            graph, outputs = CosineHeadsGraph(model), ["logits"]
            example, dynamic = features | {"clip": rows}, {"clip": {0: "labels"}}
        else:
            outputs = ["base_logits", "new_logits"]
            if model.own_tower:
                graph = OwnTowerHeadsGraph(model)
                kinds = len(model.fusion["base"])
                features = {"features": torch.nn.functional.normalize(torch.randn(TRACE_BATCH, kinds, dim), dim=-1),
                            "clip_features": features["features"]}
            else:
                graph = FVGPTHeadsGraph(model)
            example = features | {"learned": rows, "clip": rows.flip(0), "adapted": rows[:2]}
            dynamic = {"learned": {0: "labels"}, "clip": {0: "labels"}, "adapted": {0: "base_labels"}}
        export_graph(graph.eval(), example, tmp / HEADS_GRAPH, outputs,
                     {name: {0: "batch"} for name in features} | dynamic, opts.opset, {})
    return outputs


def learned_text_graph(model: FVGPTModel) -> tuple[torch.nn.Module, str, dict] | None:
    """The learner's own text graph, its file and the facts of its id (None: the shared text graph with the context
    serves it: CoOp, KgCoOp, zero-shot)."""
    if not model.own_tower:
        return None
    if model.cfg.method == "promptsrc":
        return PromptSRCTextGraph(model), "promptsrc-text.onnx", {"graph": "promptsrc-text",
                                                                   "depth": int(model.prompt.text_deep.shape[0]) + 1}
    tokens = model.prompt.text_tokens()
    return MMRLTextGraph(model), "mmrl-text.onnx", {"graph": "mmrl-text", "layers": int(tokens.shape[0]),
                                                     "tokens": int(tokens.shape[1])}


def model_id_of(kind: str, backbone: str, bundle_dir: Path, own: list[str] = ()) -> str:
    """A bundle's model id: its kind, backbone and the content of what makes it this classifier (heads, tables, and
    the tower graphs of its own: `own`)."""
    files = [HEADS_GRAPH, TABLES, *own]
    identity = hashlib.sha256("".join(sha256_file(bundle_dir / f) for f in files).encode())
    return f"{kind}-{backbone}-{identity.hexdigest()[:12]}"


def export_model(model: FVGPTModel, out: str | Path, opts: ExportOptions, pretrained: str, init_seed: int,
                 run: dict | None = None) -> Path:
    """Any model object (e.g. a generated one, for benchmarks) → a parity-gated bundle."""
    return _write_bundle(Path(out), opts, model, pretrained, init_seed, run)


def _write_bundle(out: Path, opts: ExportOptions, model: FVGPTModel, pretrained: str, init_seed: int,
                  run: dict | None) -> Path:
    bb = model.backbone
    roles = tower_roles(model)
    if opts.explain and len(roles) > 1:
        raise ExportError(f"--explain maps a one-tower bundle's image tower; a {model.cfg.method} bundle has the "
                          f"towers {', '.join(r.name for r in roles)}: export it without --explain")
    if opts.tensorrt and len(roles) > 1:
        raise ExportError(f"--tensorrt builds an engine of a one-tower bundle; a {model.cfg.method} bundle has the "
                          f"towers {', '.join(r.name for r in roles)}: serve it on ONNX Runtime or OpenVINO")
    fingerprint = bb.fingerprint()
    tmp = _prepare_out(out, opts.force)
    try:
        outputs = _export_graphs(tmp, model, roles, opts)
        save_file(bundle_tables(model), str(tmp / TABLES))
        (tmp / VOCAB).parent.mkdir()
        shutil.copyfile(bb.vocabulary_path(), tmp / VOCAB)

        def tower_graphs(runtime: str, precision: str) -> dict[str, TowerGraph]:
            """Every role's graph of runtime × precision; ids from the role's facts and the backbone's."""
            graphs = {}
            for role in roles:
                facts = role.facts | {"model": bb.name, "weights": fingerprint, "preprocess": bb.preprocess.to_dict(),
                                      "precision": precision}
                if runtime != "onnx":  # ONNX Runtime's ids predate runtimes in the format and stay as they were
                    facts["runtime"] = runtime
                file, weights = tower_files(role.stem, runtime, precision)
                graphs[role.name] = TowerGraph(file, short_id("tower", facts), runtime, precision, weights)
            return graphs

        fvgpt_kind = model.plugin is not None
        n_ctx = 0 if model.context is None else int(model.context.shape[0])
        fp32 = tower_graphs("onnx", "fp32")
        text_id = {"model": bb.name, "weights": fingerprint, "context_length": bb.context_length}
        learned = learned_text_graph(model)
        own = [fp32[r.name].file for r in roles if "prompts" in r.facts]
        manifest = Manifest(
            kind="fvgpt" if fvgpt_kind else "zero-shot",
            model_id=model_id_of("fvgpt" if fvgpt_kind else "zero-shot", bb.name, tmp, own),
            backbone=BackboneInfo(bb.name, pretrained, init_seed, fingerprint, bb.embed_dim, bb.context_length,
                                  bb.logit_scale),
            preprocess=bb.preprocess, tokenizer=Tokenizer(VOCAB, bb.context_length), classes=model.classes,
            prompts=Prompts(n_ctx, model.prompt.template if fvgpt_kind else None, ZERO_SHOT_TEMPLATE),
            towers={r.name: Tower({"onnx-fp32": fp32[r.name]}, r.input) for r in roles}, default_precision="fp32",
            text=Graph(TEXT_GRAPH, short_id("text", {"graph": "clip-text"} | text_id)),
            heads=Heads(HEADS_GRAPH, {"features": roles[-1].name} | ({"clip_features": "image"} if model.own_tower
                                                                     else {}),
                        outputs, model.plugin.tau if fvgpt_kind else None),
            tables=TABLES, max_batch=opts.max_batch, opset=opts.opset,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), fvgpt_version=fvgpt.__version__, run=run,
            files=dict.fromkeys([g.file for g in fp32.values()] + [TEXT_GRAPH, HEADS_GRAPH, TABLES, VOCAB,
                                                                   PARITY_REFERENCE]
                                + ([learned[1]] if learned else [])),
            learned_text=Graph(learned[1], short_id("text", learned[2] | text_id)) if learned else None)
        with _timed(opts, "parity: fp32 graphs vs torch"):
            pixels = parity_pixels(bb.preprocess, opts.parity_images)
            reference = _reference(model, pixels)
            if opts.explain:
                reference |= explain_reference(ExplainGraph(model).eval(), pixels)
            save_file(reference, str(tmp / PARITY_REFERENCE))  # lets `fvgpt validate` re-check without torch
            manifest.write(tmp)
            engines = {"onnx": ["fp32"]}
            reports = check_bundle(tmp, pixels, reference, engines)
            gate(reports)
        variants = _Variants(tmp, manifest, opts, pixels, reference, reports, engines)
        stems = {r.name: r.stem for r in roles}
        if opts.precision != "fp32":
            convert = quantize_int8 if opts.precision == "int8" else convert_fp16
            variants.add(tower_graphs("onnx", opts.precision),
                         lambda role, g: convert(tmp / f"{stems[role]}.fp32.onnx", tmp / g.file), required=True)
            manifest.default_precision = opts.precision
        if opts.explain:
            _explain_graphs(tmp, model, manifest, opts, pixels, reference, reports,
                            lambda runtime, precision: tower_graphs(runtime, precision)["image"])
        if opts.openvino:
            _openvino_variants(variants, tower_graphs, roles, bb.preprocess, tmp)
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
    """Adds tower variants (one runtime × precision, a graph per tower role) to a bundle under construction, each
    only after its parity checks passed."""

    def __init__(self, tmp: Path, manifest: Manifest, opts: ExportOptions, pixels: np.ndarray,
                 reference: dict[str, np.ndarray], reports: dict, engines: dict[str, list[str]]):
        self.tmp, self.manifest, self.opts, self.pixels, self.reference = tmp, manifest, opts, pixels, reference
        self.reports, self.engines = reports, engines
        self.refused: dict[str, dict] = {}  # variant key → the failing checks, for the record

    def add(self, graphs: dict[str, TowerGraph], make: Callable[[str, TowerGraph], None], required: bool) -> None:
        """Write the variant's files (`make(role, graph)` per role), gate it, keep it if it passes. A required
        variant that fails fails the export; an optional one is left out (files deleted) and recorded in
        `refused`."""
        any_graph = next(iter(graphs.values()))
        key, towers = any_graph.key, self.manifest.towers
        with _timed(self.opts, f"{key} tower graph(s)"):
            for role, graph in graphs.items():
                make(role, graph)
        for role, graph in graphs.items():
            towers[role].variants[key] = graph
            self.manifest.files |= dict.fromkeys(graph.files)
        self.manifest.write(self.tmp)
        with _timed(self.opts, f"parity: {key} towers vs torch"):
            checks = check_variant(Bundle(self.tmp, verify=False), any_graph.runtime, any_graph.precision,
                                   self.pixels, self.reference)
        if required or all(c["passed"] for c in checks.values()):
            self.reports |= checks
            gate(self.reports)
            self.engines.setdefault(any_graph.runtime, []).append(any_graph.precision)
            return
        for role in graphs:
            del towers[role].variants[key]
        shared = {f for t in towers.values() for g in t.variants.values() for f in g.files}
        for name in {f for g in graphs.values() for f in g.files} - shared:
            del self.manifest.files[name]
            (self.tmp / name).unlink()
        self.manifest.write(self.tmp)
        self.refused[key] = {k: c["failures"] for k, c in checks.items() if not c["passed"]}
        _say(self.opts, f"  {key} refused by the parity gate, not written: {self.refused[key]}")


def _explain_graphs(tmp: Path, model: FVGPTModel, manifest: Manifest, opts: ExportOptions, pixels: np.ndarray,
                    reference: dict[str, np.ndarray], reports: dict,
                    tower_graph: Callable[[str, str], TowerGraph]) -> None:
    """tower.explain.fp32.onnx and, for --precision int8/fp16, that precision's explain graph (converted like the
    tower), each gated against torch (parity.check_explain); a failing explain graph fails the export."""
    bb = model.backbone
    explain = manifest.towers["image"].explain
    for precision in dict.fromkeys(["fp32", opts.precision]):
        tower = tower_graph("onnx", precision)
        graph = TowerGraph(f"tower.explain.{precision}.onnx", tower.id.replace("tower-", "explain-", 1), "onnx",
                           precision)
        with _timed(opts, f"explain graph ({precision})"):
            if precision == "fp32":
                export_graph(ExplainGraph(model), {"pixels": torch.randn(TRACE_BATCH, 3, bb.preprocess.size,
                                                                         bb.preprocess.size)},
                             tmp / graph.file, ["features", "patch_contrib"], {"pixels": {0: "batch"}}, opts.opset,
                             {"batch": opts.max_batch})
            else:
                convert = quantize_int8 if precision == "int8" else convert_fp16
                convert(tmp / explain["onnx-fp32"].file, tmp / graph.file)
        explain[graph.key] = graph
        manifest.files[graph.file] = None
        manifest.write(tmp)
        with _timed(opts, f"parity: {precision} explain graph vs torch"):
            reports[f"explain_{precision}"] = check_explain(Bundle(tmp, verify=False), precision, pixels, reference)
            gate(reports)


def _openvino_variants(variants: _Variants, tower_graphs: Callable[[str, str], dict[str, TowerGraph]],
                       roles: list[Role], pre, tmp: Path) -> None:
    """OpenVINO fp32 and bf16 (compile settings on the ONNX fp32 graphs; bf16 only where this CPU can run it, else
    it could not be gated here) and NNCF int8 (IRs calibrated on images drawn like the parity set; a role that reads
    another's output is calibrated on that role's fp32 output)."""
    from fvgpt_runtime.openvino import unsupported

    inputs: dict[str, np.ndarray] = {}

    def make_int8(role: str, graph: TowerGraph) -> None:
        if not inputs:
            inputs.update(calibration_inputs(tmp, roles, calibration_pixels(pre, variants.opts.calibration_images)))
        stem = next(r.stem for r in roles if r.name == role)
        quantize_openvino_int8(tmp / f"{stem}.fp32.onnx", tmp / graph.file, inputs[role])

    for precision in TOWER_RUNTIMES["openvino"]:
        if reason := unsupported(precision):
            _say(variants.opts, f"  openvino-{precision} not written: {reason}")
            continue
        variants.add(tower_graphs("openvino", precision), make_int8 if precision == "int8" else lambda r, g: None,
                     required=False)


def calibration_inputs(tmp: Path, roles: list[Role], pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Each role's input on the calibration images: the pixels, or the fp32 graph of the role it reads run on them."""
    import onnxruntime as ort

    inputs: dict[str, np.ndarray] = {}
    outputs: dict[str | None, np.ndarray] = {None: pixels}
    for role in roles:
        inputs[role.name] = outputs[role.input]
        session = ort.InferenceSession(str(tmp / f"{role.stem}.fp32.onnx"), providers=["CPUExecutionProvider"])
        outputs[role.name] = session.run(None, {role.input_name: inputs[role.name]})[0]
    return inputs


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
