"""`fvgpt validate BUNDLE`: re-check every file's sha256 and re-run the parity set (like timm's onnx_validate).

The reference outputs stored at export time stand in for the torch model, so validation needs neither the run dir
nor the CLIP weights; the parity images are regenerated deterministically.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.numpy import load_file

from .bundle import read_manifest, verify_files
from .parity import check_image_graph, check_text_and_head, parity_set, parity_transform
from .tensorrt_engine import TensorRTUnavailable


def validate_bundle(path: str | Path) -> dict:
    """{"files": [problems], "checks": {name: report}, "skipped": {name: reason}, "passed": bool}."""
    path = Path(path)
    manifest = read_manifest(path)
    report: dict = {"bundle": str(path), "model_id": manifest.get("model_id"), "files": verify_files(path, manifest),
                    "checks": {}, "skipped": {}}
    if report["files"]:
        report["passed"] = False  # graphs that changed since export cannot be trusted to run
        return report
    parity = manifest["parity"]
    reference = load_file(str(path / parity["reference"]))
    pixels = parity_set(parity_transform(manifest["preprocess"]), parity["generated_images"])
    for precision in manifest["graphs"]["image"]:
        report["checks"][f"onnx_{precision}"] = check_image_graph(path, precision, "onnx", pixels, reference)
    for precision in (manifest.get("tensorrt") or {}).get("engines", {}):
        try:
            report["checks"][f"tensorrt_{precision}"] = check_image_graph(path, precision, "tensorrt", pixels,
                                                                          reference)
        except TensorRTUnavailable as exc:
            report["skipped"][f"tensorrt_{precision}"] = str(exc)
    report["checks"] |= check_text_and_head(path, reference)
    report["passed"] = all(r["passed"] for r in report["checks"].values())
    return report


def format_report(report: dict) -> str:
    lines = [f"bundle {report['bundle']} ({report['model_id']})"]
    lines += [f"  FILE {p}" for p in report["files"]] or ["  files: all sha256 match"]
    for name, r in report["checks"].items():
        agreement = ", ".join(f"{k} {v:.1%}" for k, v in r.get("top1_agreement", {}).items())
        diff = r["max_abs_diff"] if isinstance(r["max_abs_diff"], float) else max(r["max_abs_diff"].values())
        lines.append(f"  {'ok  ' if r['passed'] else 'FAIL'} {name}: max |Δ| {diff:.3g}"
                     + (f", top-1 agreement {agreement}" if agreement else "")
                     + "".join(f"\n       {f}" for f in r["failures"]))
    lines += [f"  skip {k}: {v}" for k, v in report["skipped"].items()]
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
