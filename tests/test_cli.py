"""The `fvgpt` command line end to end on generated data: train, eval, resume, and clear errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys

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
    # eval of two runs prints the paper's average row
    assert main(["eval", str(run), str(run), "--quiet"]) == 0
    assert "average over 2 runs" in capsys.readouterr().out


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


def test_progress_is_plain_lines_in_a_log_and_a_bar_on_a_terminal(demo_data, tiny_run, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    env = os.environ | {"FVGPT_PROGRESS_EVERY_S": "0"}
    run = tmp_path / "run"
    logged = subprocess.run([sys.executable, "-m", "fvgpt", "train", "--data", str(demo_data), "--out", str(run),
                             *(a for a in TINY if a != "--quiet"), "--epochs", "1", "--stage", "prompt"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert logged.returncode == 0, logged.stderr
    assert "\r" not in logged.stdout + logged.stderr
    assert re.search(r"^prompt 1/1: 1/\d+ batch \(\d+ %\), \d+ s, loss \d", logged.stderr, re.M), logged.stderr
    assert "prompt epoch 1/1: loss" in logged.stdout and re.search(r"^eval: 1/1 batch", logged.stderr, re.M)

    leader, follower = pty.openpty()  # a terminal (100 columns): tqdm's bar, redrawn with carriage returns
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "fvgpt", "eval", str(tiny_run), "--out", str(tmp_path / "m.json")],
                            stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        screen += chunk
    assert proc.wait(timeout=300) == 0
    os.close(leader)
    assert re.search(rb"\reval: +\d+%\|", screen), screen  # not the terminal's own \r\n line ends
