"""Mutation testing of the method's code with mutmut (docs/testing.md, "Mutation testing").

    python -m tests.mutation.score --run     # build .mutation/, run mutmut on the method's scope, then report
    python -m tests.mutation.score           # report the last run again

Scope: fvgpt/plugin.py, losses.py, stats.py, metrics.py, model.py, evaluate.py, and the stage-2 part of train.py
(train_plugin and what it runs: _run_stage, _lr_at, _base_loader, _seed, _set_progress); the tests are the method
tests that [tool.mutmut] in pyproject.toml selects.

mutmut 3 cannot mutate decorated functions, and evaluate(), its _features() and FVGPTModel.encode_image/tables carry
@torch.no_grad(). So the run happens in .mutation/, a copy of fvgpt/ (plus tests/, docs/, pyproject.toml) in which
each `@torch.no_grad()` above a def is rewritten as `name = torch.no_grad()(name)` right after it: the same
behaviour, and every function of the scope gets mutants. The working tree itself is never touched.

The report counts killed mutants (a timeout counts as killed), survivors, and the survivors listed in EQUIVALENT
(no test can tell them apart from the original; each with its reason); the score is killed / (all − equivalent).
"""
from __future__ import annotations

import ast
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".mutation"
SCOPE = ["fvgpt.plugin.*", "fvgpt.losses.*", "fvgpt.stats.*", "fvgpt.metrics.*", "fvgpt.model.*",
         "fvgpt.evaluate.*"] + [f"fvgpt.train.x_{name}__mutmut_*" for name in
                                ("train_plugin", "_run_stage", "_lr_at", "_base_loader", "_seed", "_set_progress")]

# (function, the mutated line as `mutmut show` prints it, stripped) → why no test can kill it
EQUIVALENT: dict[tuple[str, str], str] = {}


def undecorate(source: str) -> str:
    """`@torch.no_grad()` + def name → def name … followed by `name = torch.no_grad()(name)` in the same scope."""
    lines = source.splitlines(keepends=True)
    defs = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and len(n.decorator_list) == 1
            and ast.unparse(n.decorator_list[0]) == "torch.no_grad()"]
    for node in sorted(defs, key=lambda n: -n.lineno):
        decorator = node.decorator_list[0].lineno - 1
        indent = lines[decorator][:len(lines[decorator]) - len(lines[decorator].lstrip())]
        lines.insert(node.end_lineno, f"{indent}{node.name} = torch.no_grad()({node.name})\n")
        del lines[decorator]
    return "".join(lines)


def prepare() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    for part in ("fvgpt", "tests", "docs"):
        shutil.copytree(ROOT / part, WORK / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", WORK)
    for path in (WORK / "fvgpt").glob("*.py"):
        path.write_text(undecorate(path.read_text()))


def run() -> float:
    prepare()
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one core per mutant; fork-safe torch
    t0 = time.perf_counter()
    subprocess.run(["mutmut", "run", "--max-children", os.environ.get("MUTATION_WORKERS", "2"), *SCOPE], cwd=WORK,
                   env=env, check=True)
    return time.perf_counter() - t0


def results() -> dict[str, int | None]:
    out = {}
    for meta in (WORK / "mutants" / "fvgpt").glob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatch(name, pattern) for pattern in SCOPE):
                out[name] = code
    return out


def mutated_line(name: str) -> str:
    diff = subprocess.run(["mutmut", "show", name], cwd=WORK, capture_output=True, text=True).stdout
    return " / ".join(line[1:].strip() for line in diff.splitlines() if line.startswith("+") and
                      not line.startswith("+++"))


def report(seconds: float | None) -> int:
    from mutmut.stats import status_by_exit_code

    by_status: dict[str, list[str]] = {}
    for name, code in sorted(results().items()):
        by_status.setdefault(status_by_exit_code[code], []).append(name)
    if not by_status:
        print("no results: run `python -m tests.mutation.score --run` first")
        return 1
    killed = len(by_status.get("killed", [])) + len(by_status.get("timeout", []))
    equivalent, alive = [], []
    for name in by_status.get("survived", []) + by_status.get("no tests", []):
        key = (name.rsplit("__mutmut_", 1)[0], mutated_line(name))
        (equivalent if key in EQUIVALENT else alive).append((name, key))
    total = sum(len(v) for v in by_status.values())
    print(f"mutants in scope: {total}; " + ", ".join(f"{k}: {len(v)}" for k, v in sorted(by_status.items())))
    print(f"equivalent (listed in tests/mutation/score.py): {len(equivalent)}")
    print(f"score: {killed} killed of {total - len(equivalent)} non-equivalent = "
          f"{100 * killed / max(1, total - len(equivalent)):.1f} %")
    if seconds is not None:
        print(f"mutmut run: {seconds / 60:.1f} min wall")
    for name, (_, line) in alive:
        print(f"  survived: {name}: {line}")
    return 0


def main(argv: list[str]) -> int:
    return report(run() if "--run" in argv else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
