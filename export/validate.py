"""`fvgpt validate BUNDLE`: re-check the manifest's digest and every file's sha256, then re-run the parity checks
against the reference outputs stored at export (like timm's onnx_validate). Needs neither the run dir nor the CLIP
weights; the parity images are regenerated deterministically."""
from __future__ import annotations

from pathlib import Path

from safetensors.numpy import load_file

from fvgpt_runtime.bundle import Bundle
from fvgpt_runtime.manifest import BundleError, Manifest
from fvgpt_runtime.openvino import OpenVINOUnavailable
from fvgpt_runtime.tensorrt import TensorRTUnavailable

from .parity import check_bundle, check_explain, check_name, check_variant, parity_pixels


def validate_bundle(path: str | Path) -> dict:
    """{"files": [problems], "checks": {name: report}, "skipped": {name: reason}, "passed": bool}."""
    path = Path(path)
    report: dict = {"bundle": str(path), "model_id": None, "files": [], "checks": {}, "skipped": {}}
    try:
        manifest = Manifest.read(path)
    except BundleError as exc:
        return report | {"files": [str(exc)], "passed": False}
    report["model_id"] = manifest.model_id
    report["files"] = manifest.verify_files(path)
    if report["files"]:
        return report | {"passed": False}  # graphs that changed since export cannot be trusted to run
    parity = manifest.parity
    reference = load_file(str(path / parity["reference"]))
    pixels = parity_pixels(manifest.preprocess, parity["generated_images"])
    tower = manifest.towers["image"]
    report["checks"] = check_bundle(path, pixels, reference, {"onnx": tower.precisions("onnx")})
    bundle = Bundle(path, verify=False)
    others = [("openvino", p) for p in tower.precisions("openvino")]
    for runtime, precision in others + [("tensorrt", p) for p in (manifest.tensorrt or {}).get("image", {})]:
        try:
            report["checks"] |= check_variant(bundle, runtime, precision, pixels, reference)
        except (TensorRTUnavailable, OpenVINOUnavailable) as exc:  # not runnable on this host
            report["skipped"][check_name(runtime, precision)] = str(exc)
    for precision in [g.precision for g in tower.explain.values()]:
        report["checks"][f"explain_{precision}"] = check_explain(bundle, precision, pixels, reference)
    report["passed"] = all(r["passed"] for r in report["checks"].values())
    return report


def format_report(report: dict) -> str:
    lines = [f"bundle {report['bundle']} ({report['model_id']})"]
    lines += [f"  FILE {p}" for p in report["files"]] or ["  files: manifest digest and every sha256 match"]
    for name, r in report["checks"].items():
        agreement = ", ".join(_agreement(k, v, r["mean_kl"][k]) for k, v in r.get("flips", {}).items())
        cosine = f", min cosine {r['min_cosine']:.6f}" if "min_cosine" in r else ""
        if "max_probability_diff" in r:
            figures = f"alone vs batch of {r['batch']}: max |Δp| {max(r['max_probability_diff'].values()):.3g}"
        else:
            figures = f"max |Δ| {max(r['max_abs_diff'].values()):.3g}" + cosine + (
                f", top-1 agreement {agreement}" if agreement else "")
        lines.append(f"  {'ok  ' if r['passed'] else 'FAIL'} {name}: {figures}"
                     + "".join(f"\n       {f}" for f in r["failures"]))
    lines += [f"  skip {k}: {v}" for k, v in report["skipped"].items()]
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def _agreement(output: str, flips: dict, mean_kl: float) -> str:
    """"new_logits 100.0% (2 near-ties within the logit error 0.4), mean KL 0.0014": margin-aware (export/parity.py)."""
    ties = f" ({flips['near_ties']} near-ties within the logit error {flips['logit_error']:.3g})" \
        if flips["near_ties"] else ""
    return f"{output} {flips['agreement']:.1%}{ties}, mean KL {mean_kl:.2g}"
