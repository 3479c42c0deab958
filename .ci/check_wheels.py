"""Does every dependency in pyproject.toml have a wheel for each supported Python? One `pip download --no-deps
--only-binary=:all: --python-version X` per requirement and version (this machine's platform), files deleted after.

    python .ci/check_wheels.py [--pythons 3.11,3.12,3.13] > table.md

Prints a Markdown table (the wheel pip picked, or why there is none) for docs/python-versions.md; exits 1 if a
requirement outside the `trt` extra (NVIDIA's index, documented as such) has no wheel for a version. Needs PyPI.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
OUTSIDE_PYPI = {"trt"}  # extras installed from NVIDIA's index, never by CI


def requirements() -> list[tuple[str, str]]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    rows = [("core", r) for r in project["dependencies"]]
    return rows + [(extra, r) for extra, reqs in project["optional-dependencies"].items() for r in reqs]


def wheel_for(requirement: str, python: str) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="fvgpt-wheels-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--python-version", python, "--disable-pip-version-check", "-q", "-d", tmp,
                               requirement], capture_output=True, text=True)
        files = sorted(p.name for p in Path(tmp).iterdir())
    if proc.returncode == 0 and files:
        return True, files[0]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()
    return False, (lines[0] if lines else f"pip exited {proc.returncode}").replace("|", "/")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pythons", default="3.11,3.12,3.13", help="comma-separated Python versions")
    pythons = parser.parse_args().pythons.split(",")
    print("| extra | requirement | " + " | ".join(f"Python {p}" for p in pythons) + " |")
    print("|---|---|" + "---|" * len(pythons))
    missing = 0
    for extra, requirement in requirements():
        cells = []
        for python in pythons:
            ok, what = wheel_for(requirement, python)
            cells.append(f"`{what}`" if ok else f"**no wheel**: {what}")
            missing += not ok and extra not in OUTSIDE_PYPI
        print(f"| {extra} | `{requirement}` | " + " | ".join(cells) + " |", flush=True)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
