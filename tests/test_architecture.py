"""The import rules of docs/architecture.md, checked on every module's imports, and the torch-free serving path,
checked by running the real server with torch and open_clip made unimportable."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from fvgpt_serving.cli import server_command
from fvgpt_serving.process import free_port, stop, wait_ready

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"fvgpt": REPO / "fvgpt", "fvgpt_runtime": REPO / "runtime", "fvgpt_export": REPO / "export",
            "fvgpt_serving": REPO / "serving", "benchmarks": REPO / "benchmarks"}
TORCH_FREE_CORE = {"fvgpt", "fvgpt.errors", "fvgpt.labels", "fvgpt.classes", "fvgpt.preprocess", "fvgpt.config",
                   "fvgpt.datasets", "fvgpt.photos", "fvgpt.progress", "fvgpt.world"}
TORCH = {"torch", "torchvision", "open_clip"}
FOLDER_NAMES = {"export", "serving", "runtime"}  # never importable names of installed code
# benchmark scripts on the serving hot path: they measure the runtime, so they may not pull torch in
TORCH_FREE_BENCHMARKS = {"benchmarks.common", "benchmarks.http_load", "benchmarks.graph_overhead"}
# web frameworks: only the shell around the serving engine (fvgpt_serving.shell) may import them
WEB = {"bentoml", "_bentoml_sdk", "_bentoml_impl", "starlette", "uvicorn", "h11", "fastapi", "circus"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports inside functions count), relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}  # `from fvgpt import labels` imports a module
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def violations() -> list[str]:
    modules = _modules()
    problems = []
    for module, path in sorted(modules.items()):
        package = _top(module)
        for name in sorted(_imports(module, path)):
            top = _top(name)
            fvgpt_part = name if name in modules else name.rpartition(".")[0]
            rules = {
                "imports a folder name, not the installed module": top in FOLDER_NAMES,
                "fvgpt imports a package built on it": package == "fvgpt" and top in
                    {"fvgpt_runtime", "fvgpt_export", "fvgpt_serving", "benchmarks"},
                "imports torch/open_clip on the torch-free path": top in TORCH and (
                    package in ("fvgpt_runtime", "fvgpt_serving") or module in TORCH_FREE_CORE
                    or module in TORCH_FREE_BENCHMARKS),
                "imports fvgpt beyond its torch-free core": top == "fvgpt" and fvgpt_part not in TORCH_FREE_CORE and (
                    package in ("fvgpt_runtime", "fvgpt_serving") or module in TORCH_FREE_CORE
                    or module in TORCH_FREE_BENCHMARKS),
                "imports the exporter or serving from the runtime": package == "fvgpt_runtime" and top in
                    {"fvgpt_export", "fvgpt_serving", "benchmarks"},
                "imports the exporter from serving": package == "fvgpt_serving" and top in {"fvgpt_export",
                                                                                          "benchmarks"},
                "imports benchmarks from the library": package != "benchmarks" and top == "benchmarks",
                "imports a web framework outside the serving shell": top in WEB and (
                    package in ("fvgpt", "fvgpt_runtime", "fvgpt_export") or module.startswith("fvgpt_serving.engine")),
                "imports the serving shell from the engine": module.startswith("fvgpt_serving.engine")
                    and name.startswith("fvgpt_serving.shell"),
            }
            problems += [f"{module} imports {name}: {rule}" for rule, broken in rules.items() if broken]
    return problems


def test_import_rules_hold():
    assert violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rules are live: a runtime module that imports torch lazily, inside a function, is caught, and so is an
    engine module that imports BentoML, Starlette or uvicorn, or the shell."""
    fake = tmp_path / "runtime"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    import torch\n    from fvgpt.model import FVGPTModel\n")
    monkeypatch.setitem(PACKAGES, "fvgpt_runtime", fake)
    serving = tmp_path / "serving"
    shutil.copytree(REPO / "serving", serving)
    (serving / "engine" / "bad.py").write_text("import bentoml\n\ndef f():\n    from starlette.requests import "
                                               "Request\n    import uvicorn\n    from ..shell import service\n")
    monkeypatch.setitem(PACKAGES, "fvgpt_serving", serving)
    found = violations()
    assert any("fvgpt_runtime.bad imports torch" in v for v in found)
    assert any("fvgpt_runtime.bad imports fvgpt.model" in v for v in found)
    for name in ("bentoml", "starlette.requests", "uvicorn"):
        assert f"fvgpt_serving.engine.bad imports {name}: imports a web framework outside the serving shell" in found
    assert "fvgpt_serving.engine.bad imports fvgpt_serving.shell.service: imports the serving shell from the " \
           "engine" in found
    assert not [v for v in found if "fvgpt_serving.shell" in v.split(" imports ")[0]]  # the shell may


BLOCKER = textwrap.dedent("""
    # sitecustomize for the torch-free test: every process of the server starts with these modules unimportable
    import os, sys

    class _Block:
        BLOCKED = tuple(os.environ.get("FVGPT_TEST_BLOCKED", "torch,torchvision,open_clip,fvgpt_export").split(","))

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked: the serving path must not need it")
            return None

    sys.meta_path.insert(0, _Block())
""")


@pytest.fixture(scope="module")
def torch_blocked_env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("blocker")
    (site / "sitecustomize.py").write_text(BLOCKER)
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_runtime_and_serving_import_without_torch(torch_blocked_env):
    modules = [m for m in _modules() if _top(m) in ("fvgpt_runtime", "fvgpt_serving") or m in TORCH_FREE_CORE]
    code = ("import importlib, sys\ntry:\n    import torch\n    sys.exit('the block does not work')\n"
            "except ImportError:\n    pass\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules))
    proc = subprocess.run([sys.executable, "-c", code], env=torch_blocked_env, capture_output=True, text=True,
                          cwd=REPO.parent, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("command", [["--help"], ["serve", "--help"], ["validate", "--help"],
                                     ["world", "task", "--help"]])
def test_the_command_line_builds_without_torch(torch_blocked_env, command):
    """A serving host has no torch: `fvgpt` must still build its whole parser (every subcommand's options)."""
    # a torch-free install still has the exporter's CLI registration, which needs no torch either
    env = torch_blocked_env | {"FVGPT_TEST_BLOCKED": "torch,torchvision,open_clip"}
    proc = subprocess.run([sys.executable, "-m", "fvgpt.cli", *command], env=env, capture_output=True, text=True,
                          cwd=REPO.parent, timeout=120)
    assert proc.returncode == 0 and "usage: fvgpt" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_served_classify_with_new_labels_needs_no_torch(tiny_bundle, torch_blocked_env, tmp_path):
    from fvgpt.photos import photo_paths
    from fvgpt_runtime.bundle import Bundle
    from fvgpt_runtime.preprocess import preprocess
    from PIL import Image

    port = free_port()
    env = torch_blocked_env | {"FVGPT_BUNDLE": str(tiny_bundle), "FVGPT_MAX_BATCH_SIZE": "4"}
    with open(tmp_path / "server.log", "w+") as log:
        proc = subprocess.Popen(server_command("127.0.0.1", port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=tmp_path)
        try:
            try:
                wait_ready(proc, f"http://127.0.0.1:{port}", 120)
            except RuntimeError:
                log.seek(0)
                pytest.fail(log.read()[-4000:])
            photo = photo_paths()[1]
            labels = ["a tabby cat", "a rocket", "red_circle"]  # two labels outside the bundle: the text graph runs
            r = httpx.post(f"http://127.0.0.1:{port}/classify", timeout=60,
                           files=[("images", (photo.name, photo.read_bytes(), "image/jpeg"))],
                           data={"labels": labels, "top_k": "3"})
            assert r.status_code == 200, r.text
        finally:
            stop(proc)
        log.seek(0)
        assert "is blocked" not in log.read()  # nothing even tried to import torch and failed quietly
    result = r.json()["results"][0]
    bundle = Bundle(tiny_bundle)  # in-process reference (this process has torch; the runtime does not use it)
    want = bundle.classify(preprocess(Image.open(photo), bundle.preprocess)[None], labels)
    assert result["head"] == want.head == "new"
    got = {p["label"]: p["probability"] for p in result["predictions"]}
    assert got == pytest.approx(dict(zip(want.labels, want.probabilities[0].tolist())), abs=1e-5)
    assert json.dumps(result)  # plain JSON
