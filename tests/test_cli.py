"""The `fvgpt` command line end to end on generated data: train, eval, resume, and clear errors."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from fvgpt.cli import main
from fvgpt.rundir import RunDirError, load_run
from fvgpt.train import train

TINY = ["--model", "fvgpt-tiny", "--pretrained", "none", "--shots", "3", "--epochs", "2", "--lr", "0.02", "--quiet"]


def test_help_explains_every_command():
    out = subprocess.run([sys.executable, "-m", "fvgpt.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "eval", "masks", "demo", "export", "validate", "serve", "tune"):
        assert command in out.stdout
    train_help = subprocess.run([sys.executable, "-m", "fvgpt.cli", "train", "--help"], capture_output=True,
                                text=True, check=True).stdout
    for option in ("--data", "--pretrained", "--method", "--shots", "--stage", "--resume", "--base-classes"):
        assert option in train_help
    # every config field is an option, with its help text and default from the field (fvgpt.config)
    from dataclasses import MISSING, fields

    from fvgpt.config import TrainConfig

    flat = " ".join(train_help.split())
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in train_help, f.name
        assert " ".join(f.metadata["help"].split()) in flat, f.name
        if f.default not in (None, "", MISSING) and not isinstance(f.default, bool):
            assert f"(default: {f.default})" in flat, f.name


def test_train_then_eval_end_to_end(demo_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(run), "--method", "kgcoop", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "fvgpt" in printed and "kgcoop" in printed and "HM" in printed
    for name in ("config.json", "classes.json", "data.json", "prompt.safetensors", "plugin.safetensors",
                 "metrics.json", "train_log.jsonl", "progress.json"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["schema_version"] == 2
    assert config["train"]["method"] == "kgcoop" and config["train"]["ctx_init"] == "a photo of a"
    assert config["train"]["prompt_augment"] is True  # KgCoOp's default, resolved and stored
    assert config["train"]["lambda_d"] == 10.0 and config["train"]["tau"] == 2.0  # loss weights are in the config
    assert len(config["backbone"]["fingerprint"]) == 64
    classes = json.loads((run / "classes.json").read_text())
    assert [c["base"] for c in classes] == [True] * 3 + [False] * 3
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in log] == [("prompt", 1), ("prompt", 2), ("plugin", 1), ("plugin", 2)]
    assert all(r["kg"] >= 0 for r in log if r["stage"] == "prompt")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"zero-shot", "kgcoop", "fvgpt"}
    row = metrics["models"]["fvgpt"]
    assert 0 <= row["base"] <= 100 and 0 <= row["new"] <= 100 and row["d_fg"]["tau1"] >= 0
    # several runs print one row per method (the same run twice counts once)
    assert main(["eval", str(run), str(run), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "counted once" in err and re.search(r"^\S+ +fvgpt\+kgcoop +1 ", out, re.MULTILINE), out


def test_existing_run_dir_is_not_overwritten(tiny_run, demo_data, capsys):
    before = (tiny_run / "plugin.safetensors").read_bytes()
    assert main(["train", "--data", str(demo_data), "--out", str(tiny_run), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (tiny_run / "plugin.safetensors").read_bytes() == before


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_resume_after_interruption_matches_an_uninterrupted_run(demo_data, tmp_path):
    cfg = tiny_config(demo_data, prompt_epochs=2, plugin_epochs=3)
    train(cfg, tmp_path / "whole", progress=False)

    def stop_after_first_plugin_epoch(stage: str, epoch: int) -> None:
        if stage == "plugin" and epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", hook=stop_after_first_plugin_epoch, progress=False)
    with pytest.raises(RunDirError, match="stage 2"):
        load_run(tmp_path / "cut", require_plugin=True)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    whole, cut = (load_file(tmp_path / name / "plugin.safetensors") for name in ("whole", "cut"))
    assert whole.keys() == cut.keys()
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 1, 2, 3]


def test_stages_can_run_separately(demo_data, tmp_path):
    run = tmp_path / "staged"
    train(tiny_config(demo_data), run, stage="prompt", progress=False)
    assert not (run / "plugin.safetensors").exists()
    with pytest.raises(RunDirError, match="--resume"):
        train(tiny_config(demo_data), run, stage="plugin", progress=False)
    train(tiny_config(demo_data), run, stage="plugin", resume=True, progress=False)
    assert load_run(run, require_plugin=True).model.plugin is not None


def test_config_loading_refuses_unknown_and_names_missing_keys(tiny_run, tmp_path):
    from fvgpt.config import ConfigError, TrainConfig

    stored = json.loads((tiny_run / "config.json").read_text())["train"]
    assert TrainConfig.from_dict(stored).to_dict() == stored
    with pytest.raises(ConfigError, match=r"unknown keys \['lambda_x'\]"):
        TrainConfig.from_dict(stored | {"lambda_x": 1.0})
    with pytest.raises(ConfigError, match=r"missing keys \['tau'\]"):
        TrainConfig.from_dict({k: v for k, v in stored.items() if k != "tau"})
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"train": stored, "backbone": {}}))  # no schema_version: fvgpt 0.1
    with pytest.raises(RunDirError, match="config schema 1.*train it again"):
        load_run(old)


def test_shortcut_and_per_stage_options(demo_data, tmp_path):
    from fvgpt.cli import _config_from_args, build_parser

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--epochs", "3", "--plugin-epochs", "5",
                                      "--lr", "0.1", "--no-pc-kl", "--base-classes", "a,b"])
    cfg = _config_from_args(args)
    assert (cfg.prompt_epochs, cfg.plugin_epochs, cfg.prompt_lr, cfg.plugin_lr) == (3, 5, 0.1, 0.1)
    assert cfg.pc_kl is False and cfg.base_classes == ["a", "b"] and cfg.lambda_d == 10.0


@pytest.mark.parametrize("argv, message", [(["--epochs", "0"], "prompt_epochs must be at least 1"),
                                           (["--tau", "0"], "tau must be positive"),
                                           (["--area-min", "0.9", "--area-max", "0.5"], "area_min < area_max"),
                                           (["--no-fdc", "--no-prior-calibration"], "nothing to train")])
def test_nonsense_settings_are_refused(demo_data, tmp_path, capsys, argv, message):
    assert main(["train", "--data", str(demo_data), "--out", str(tmp_path / "r"), *TINY, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_version_and_python_dash_m():
    from importlib.metadata import version as installed_version

    version = installed_version("fvgpt-serve")  # what pip installed, as its metadata says
    out = subprocess.run([sys.executable, "-m", "fvgpt", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"fvgpt {version} (Python {sys.version.split()[0]})")


def test_every_option_of_every_command_has_help():
    import argparse

    from fvgpt.cli import build_parser

    def walk(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield path, action

    commands = set()
    for path, action in walk(build_parser(), "fvgpt"):
        commands.add(path)
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{path} {name}"
    assert {"fvgpt train", "fvgpt eval", "fvgpt masks", "fvgpt export", "fvgpt serve"} <= commands


def on_terminal(argv: list[str], env: dict | None = None, until=None, timeout: float = 300) -> tuple[int, bytes]:
    """Run `python -m fvgpt ARGV` with stdout and stderr on a pseudo-terminal (100 columns, so tqdm draws its bar,
    redrawn with carriage returns); `until(proc)`, if given, is called as output arrives (e.g. to send a signal).
    Returns the exit status and everything the terminal showed."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import termios

    deadline = time.monotonic() + timeout
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "fvgpt", *argv], stdout=follower, stderr=follower, env=env)
    os.close(follower)
    screen = b""
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fvgpt {' '.join(argv)} still runs after {timeout} s: {screen[-2000:]!r}")
            if until is not None:
                until(proc)
            if not select.select([leader], [], [], 0.02)[0]:
                continue
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closes when the process exits
                break
            if not chunk:
                break
            screen += chunk
        return proc.wait(timeout=timeout), screen
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()


def test_progress_is_plain_lines_in_a_log_and_a_bar_on_a_terminal(demo_data, tiny_run, tmp_path):
    import os

    env = os.environ | {"FVGPT_PROGRESS_EVERY_S": "0"}
    run = tmp_path / "run"
    logged = subprocess.run([sys.executable, "-m", "fvgpt", "train", "--data", str(demo_data), "--out", str(run),
                             *(a for a in TINY if a != "--quiet"), "--epochs", "1", "--stage", "prompt"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert logged.returncode == 0, logged.stderr
    assert "\r" not in logged.stdout + logged.stderr
    assert re.search(r"^prompt 1/1: 1/\d+ batch \(\d+ %\), \d+ s, loss \d", logged.stderr, re.M), logged.stderr
    assert "prompt epoch 1/1: loss" in logged.stdout and re.search(r"^eval: 1/1 batch", logged.stderr, re.M)

    status, screen = on_terminal(["eval", str(tiny_run), "--out", str(tmp_path / "m.json")], env)
    assert status == 0, screen
    assert re.search(rb"\reval: +\d+%\|", screen), screen  # not the terminal's own \r\n line ends


TERMINAL_RUN = ["--model", "fvgpt-tiny", "--pretrained", "none", "--shots", "3", "--epochs", "2", "--plugin-epochs",
                "6", "--lr", "0.02", "--no-eval"]


@pytest.fixture(scope="module")
def quiet_run(demo_data, tmp_path_factory):
    """TERMINAL_RUN trained straight through with --quiet: what every other output mode must reproduce."""
    out = tmp_path_factory.mktemp("quiet") / "run"
    assert main(["train", "--data", str(demo_data), "--out", str(out), *TERMINAL_RUN, "--quiet"]) == 0
    return out


def _assert_equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training(a, b) -> None:
    """Every learned weight, the optimiser's state (momentum) and every logged loss, bit for bit."""
    for name in ("prompt.safetensors", "plugin.safetensors"):
        _assert_equal(load_file(a / name), load_file(b / name), name)
    for stage in ("prompt", "plugin"):
        _assert_equal(*(torch.load(r / "state" / f"{stage}.pt", weights_only=True) for r in (a, b)), stage)
    drop = ("seconds", "images_per_s")
    losses = [[{k: v for k, v in json.loads(line).items() if k not in drop}
               for line in (r / "train_log.jsonl").read_text().splitlines()] for r in (a, b)]
    assert losses[0] == losses[1]


def test_training_with_a_bar_on_a_terminal_equals_quiet_training(demo_data, quiet_run, tmp_path):
    """Issue 21.1: a tqdm bar once changed the batch order (tqdm.auto iterated the DataLoader early, drawing from its
    shuffle generator), so results depended on the output mode."""
    run = tmp_path / "bar"
    status, screen = on_terminal(["train", "--data", str(demo_data), "--out", str(run), *TERMINAL_RUN])
    assert status == 0, screen
    assert re.search(rb"\rprompt 1/2: +\d+%\|", screen) and re.search(rb"\rplugin 6/6: +\d+%\|", screen), screen
    assert_same_training(quiet_run, run)


def test_ctrl_c_names_the_resume_command_which_alone_finishes_the_run(demo_data, quiet_run, tmp_path):
    """Issue 21.3 (and 21.1 across an interruption): a real SIGINT during training on a terminal prints the exact
    command to continue; that command (no data options: config.json holds them) ends with the weights of the quiet,
    uninterrupted run."""
    import signal

    run = tmp_path / "cut run"  # a space: the printed command must quote it
    log = run / "train_log.jsonl"
    sent = []

    def interrupt_after_the_first_epoch(proc) -> None:
        if not sent and log.is_file() and log.read_text().strip():
            proc.send_signal(signal.SIGINT)
            sent.append(True)

    status, screen = on_terminal(["train", "--data", str(demo_data), "--out", str(run), *TERMINAL_RUN],
                                 until=interrupt_after_the_first_epoch)
    text = screen.decode()
    assert status == 130 and sent, text
    assert 1 <= len(log.read_text().splitlines()) < 8, "the run was not interrupted mid-way"
    command = re.search(r"Continue with:\r?\n +(fvgpt train .*?)\r?\n", text)
    assert command, text
    argv = shlex.split(command.group(1))
    assert argv == ["fvgpt", "train", "--out", str(run), "--resume", "--no-eval"]
    status, screen = on_terminal(argv[1:])
    assert status == 0, screen
    assert_same_training(quiet_run, run)


def test_resume_keeps_the_runs_settings_and_says_which_were_ignored(tiny_run, tmp_path, capsys):
    import shutil

    run = shutil.copytree(tiny_run, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--out", str(run), "--resume", "--epochs", "5", "--no-eval", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "ignored: --prompt-epochs 5 (the run has 2), --plugin-epochs 5 (the run has 2)" in err, err
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # finished: nothing to redo
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "--quiet"]) == 2
    assert "--resume given but" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_a_run_trained_with_relative_paths_works_from_any_directory(demo_data, tmp_path, monkeypatch, capsys):
    """Issue 21.2: --data, --pretrained (a checkpoint file) and --out given relative to one folder; eval and export
    from another. A run whose config still names its checkpoint relatively (older fvgpt) gets a clear error."""
    import os

    from safetensors.torch import save_file

    from fvgpt.backbone import load_backbone

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "weights").mkdir(parents=True)
    elsewhere.mkdir()
    checkpoint = work / "weights" / "tiny.safetensors"
    save_file(load_backbone("fvgpt-tiny", "none", init_seed=3).model.state_dict(), checkpoint)
    monkeypatch.chdir(work)
    assert main(["train", "--data", os.path.relpath(demo_data, work), "--pretrained", "weights/tiny.safetensors",
                 "--out", "runs/r", *(a for a in TINY if a not in ("--pretrained", "none")), "--no-eval"]) == 0
    run = work / "runs" / "r"
    stored = json.loads((run / "config.json").read_text())
    assert stored["train"]["pretrained"] == str(checkpoint)
    assert stored["train"]["data"] == str(demo_data)

    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(run), "--quiet"]) == 0
    assert main(["export", str(run), "--out", "bundle", "--parity-images", "8"]) == 0
    manifest = json.loads((elsewhere / "bundle" / "manifest.json").read_text())
    assert manifest["backbone"]["pretrained"] == str(checkpoint)

    stored["train"]["pretrained"] = "weights/tiny.safetensors"  # as older fvgpt wrote it
    (run / "config.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert main(["eval", str(run), "--quiet", "--recompute"]) == 2
    err = capsys.readouterr().err
    assert "relative to the folder the run was trained in" in err and "absolute path" in err, err
    monkeypatch.chdir(work)  # from the folder it was trained in, it still works
    assert main(["eval", str(run), "--quiet", "--recompute"]) == 0
