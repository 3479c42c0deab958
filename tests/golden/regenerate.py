"""Regenerate the golden outputs in tests/golden/ after a deliberate change: `python -m tests.golden.regenerate`.

Runs tests/test_golden.py with FVGPT_REGENERATE_GOLDEN=1, which writes every tests/golden/<name>.json from the
current code (the fixed inputs, tests/golden/inputs.safetensors, are created once and never rewritten) and prints
which outputs moved; then shows `git diff --stat` of the folder. Review and commit the diff with the change that
caused it (docs/testing.md, "Golden outputs").
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    env = os.environ | {"FVGPT_REGENERATE_GOLDEN": "1"}
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          "tests/test_golden.py"], cwd=ROOT, env=env)
    if rc == 0:
        subprocess.call(["git", "diff", "--stat", "--", "tests/golden"], cwd=ROOT)
    return rc


if __name__ == "__main__":
    sys.exit(main())
