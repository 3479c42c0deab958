"""The documented examples run. Every fenced block marked `<!-- example -->` in README.md, serving/README.md and
docs/*.md is run as a reader would run it: from a folder laid out like the repository root after `fvgpt demo`
(`demo/bundle`, `fvgpt/assets`), against `fvgpt serve demo/bundle` on loopback (the docs' port 3000; 3001 is the same
bundle with FVGPT_API_KEY=s3cret). Each command must succeed, and where the docs show its output (the `# ...` lines
under it) the printed JSON or Python value must have that shape: every key shown, the heads in order, only labels
the bundle or the request has, the error texts, names and kinds the answer has. So an example cannot drift unnoticed.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fvgpt.cli import main
from serving_support import Server, running

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- example -->"
DOCS = [ROOT / "README.md", ROOT / "serving" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KEY = "s3cret"
PORTS = {"3000": {}, "3001": {"FVGPT_API_KEY": KEY}}  # the docs' port → the server's settings


@dataclass
class Command:
    text: str
    shown: list[str] = field(default_factory=list)  # the documented output: the comment lines right under it


@dataclass
class Example:
    where: str
    language: str
    code: str
    commands: list[Command]


def _blocks(path: Path) -> list[tuple[int, str, str]]:
    """(line, language, code) of every fenced block right under the marker."""
    lines, found = path.read_text().splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() == MARK:
            fence = lines[i + 1].strip()
            assert fence.startswith("```"), f"{path.name}:{i + 1}: {MARK} must sit right above a fenced block"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            found.append((i + 2, fence[3:], "\n".join(lines[i + 2:end])))
    return found


def _commands(code: str, language: str) -> list[Command]:
    """Shell: one command per line (backslash continuations joined); Python: one command per print() call. The
    comment lines right under a command are its documented output."""
    commands: list[Command] = []
    pending = ""
    for raw in code.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            if commands and not pending and line.startswith("# ") and commands[-1].text:
                commands[-1].shown.append(line[2:])
            continue
        if not line:
            if commands:
                commands.append(Command(""))  # a blank line ends the output shown under a command
            continue
        if language == "bash":
            pending += raw.rstrip("\\").rstrip() + " " if raw.endswith("\\") else raw
            if not raw.endswith("\\"):
                commands.append(Command(pending.strip()))
                pending = ""
        else:
            commands.append(Command(line))
    return [c for c in commands if c.text]


def examples() -> list[Example]:
    found = []
    for path in DOCS:
        for line, language, code in _blocks(path):
            assert language in ("bash", "python"), f"{path.name}:{line}: only bash and python examples run"
            found.append(Example(f"{path.relative_to(ROOT)}:{line}", language, code, _commands(code, language)))
    return found


# ---- what a documented output says --------------------------------------------------------------------------------
KEY_RE = re.compile(r"""["'](\w+)["']\s*:""")


def _values(text: str, key: str) -> list[str]:
    return re.findall(rf"""["']{key}["']\s*:\s*["']([^"']*)["']""", text)


def _walk(value, key: str | None = None):
    """(key, value) of every scalar and every key in a parsed answer, depth first, in document order."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, None
            yield from _walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)
    else:
        yield key, value


def check_shown(shown: str, printed: str, allowed_labels: set[str], where: str) -> None:
    """The documented output `shown` (possibly elided with `...`) against what the command printed."""
    printed = printed.strip()
    try:
        answer = json.loads(printed)
    except ValueError:
        try:
            answer = ast.literal_eval(printed)
        except (ValueError, SyntaxError):
            raise AssertionError(f"{where}: the docs show {shown[:80]!r} but the command printed {printed[:300]!r}")
    pairs = list(_walk(answer))
    keys = {k for k, _ in pairs if k is not None}
    missing = set(KEY_RE.findall(shown)) - keys
    assert not missing, f"{where}: the docs show keys {sorted(missing)} the answer does not have: {printed[:300]}"
    heads = [str(v) for k, v in pairs if k == "head" and v is not None]
    assert heads[:len(_values(shown, "head"))] == _values(shown, "head"), f"{where}: heads {heads} ≠ the docs'"
    for key in ("error", "model", "kind", "name"):
        wrong = set(_values(shown, key)) - {str(v) for k, v in pairs if k == key}
        assert not wrong, f"{where}: the docs show {key} {sorted(wrong)}; the answer has no such {key}"
    unknown = set(_values(shown, "label")) - allowed_labels
    assert not unknown, f"{where}: the docs show labels {sorted(unknown)} that neither the bundle nor the request has"


def _request_labels(command: str) -> set[str]:
    """Labels a command sends: `-F labels=X` fields and the strings of a "labels" or labels= list."""
    found = set(re.findall(r"labels=([^\s'\"]+)", command))
    for group in re.findall(r"""labels["']?\s*[:=]\s*\[([^\]]*)\]""", command):
        found |= set(re.findall(r"""\\?["']([^"'\\]+)\\?["']""", group))
    return found


# ---- running them -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder laid out like the repository root after `fvgpt demo` (the README's first command): `--quick` has
    the same task classes, base and new, with fewer images and training steps."""
    work = tmp_path_factory.mktemp("reader")
    assert main(["demo", "--quick", "--no-serve", "--out", str(work / "demo")]) == 0
    (work / "fvgpt").mkdir()
    (work / "fvgpt" / "assets").symlink_to(ROOT / "fvgpt" / "assets")
    (work / "README.md").symlink_to(ROOT / "README.md")
    return work


@pytest.fixture(scope="module")
def servers(workdir, tmp_path_factory) -> dict[str, Server]:
    logs = tmp_path_factory.mktemp("doc-servers")
    started = {port: Server(workdir / "demo" / "bundle", logs / f"{port}.log", **env) for port, env in PORTS.items()}
    with running(*started.values()):
        yield started


def _bundle_labels(workdir: Path) -> set[str]:
    manifest = json.loads((workdir / "demo" / "bundle" / "manifest.json").read_text())
    return {c["name"] for c in manifest["classes"]}


def _on_servers(text: str, servers: dict[str, Server]) -> str:
    for port, server in servers.items():
        text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{server.port}")
    return text


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _shows_an_answer(command: Command) -> bool:
    return bool(command.shown) and command.shown[0].lstrip()[:1] in "{["


def run_shell(example: Example, workdir: Path, servers: dict[str, Server], labels: set[str]) -> None:
    cwd = workdir
    for command in example.commands:
        words = shlex.split(command.text, comments=True)
        if words[:2] == ["fvgpt", "serve"]:  # the servers the fixture started, on what the docs serve
            assert (cwd / words[2]).resolve() == (workdir / "demo" / "bundle").resolve(), command.text
            continue
        if words[0] == "cd":
            cwd = cwd / words[1]
            continue
        done = subprocess.run(["bash", "-c", _on_servers(command.text, servers)], cwd=cwd, env=_env(),
                              check=False, capture_output=True, text=True, timeout=120)
        where = f"{example.where}: `{command.text[:100]}`"
        assert done.returncode == 0, f"{where} exited {done.returncode}: {done.stderr[-2000:]}"
        if _shows_an_answer(command):
            check_shown(" ".join(command.shown), done.stdout, labels | _request_labels(command.text), where)


def run_python(example: Example, workdir: Path, servers: dict[str, Server], labels: set[str]) -> None:
    done = subprocess.run([sys.executable, "-c", _on_servers(example.code, servers)], cwd=workdir, env=_env(),
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{example.where} failed: {done.stderr[-3000:]}"
    printed = done.stdout.splitlines()
    prints = [c for c in example.commands if c.text.startswith("print(")]
    assert len(printed) >= len(prints), f"{example.where}: {len(prints)} prints, printed {printed}"
    for command, line in zip(prints, printed):
        if _shows_an_answer(command):
            check_shown(" ".join(command.shown), line, labels | _request_labels(example.code),
                        f"{example.where}: `{command.text[:100]}`")


def test_the_docs_have_examples_that_run():
    where = {e.where.split(":")[0] for e in examples()}
    assert {"README.md", "serving/README.md"} <= where, where  # the two pages a new user reads first


@pytest.mark.parametrize("example", examples(), ids=lambda e: e.where)
def test_documented_example_runs_as_shown(example, workdir, servers):
    labels = _bundle_labels(workdir)
    (run_shell if example.language == "bash" else run_python)(example, workdir, servers, labels)


def test_a_drifted_output_is_caught():
    """The checker itself: each kind of drift the docs once had is refused (issue 21 item 7's findings)."""
    answer = json.dumps({"results": [{"model": "demo", "head": "base",
                                      "predictions": [{"label": "red_circle", "probability": 0.6}]}]})
    labels = {"red_circle", "blue_square"}
    check_shown('{"results":[{"model":"demo","head":"base","predictions":[{"label":"red_circle",...}]}]}',
                answer, labels, "ok")
    for drifted in ('{"image_graph": {...}}',  # a key the answer no longer has
                    '{"results":[{"head":"new", ...}]}',  # the wrong head
                    '{"results":[{"predictions":[{"label":"red circle"}]}]}',  # a label the bundle lacks
                    '{"results":[{"model":"shapes"}]}'):  # another bundle's name
        with pytest.raises(AssertionError):
            check_shown(drifted, answer, labels, "drift")
