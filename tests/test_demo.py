"""`fvgpt demo --quick`: the README's main command end to end in the generated world (task, training with the
committed micro-CLIP, the side-by-side table, export, validation), on a small task."""
from __future__ import annotations

import json

from fvgpt.cli import main


def test_demo_runs_the_pipeline_in_the_world(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-serve", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("zero-shot", "coop", "fvgpt"):
        assert f"\n{row} " in printed, row
    assert "test images: 20 base, 20 new" in printed
    config = json.loads((out / "run" / "config.json").read_text())["train"]
    assert config["model"] == "fvgpt-micro" and config["pretrained"].endswith("fvgpt-micro-world.safetensors")
    task = json.loads((out / "task" / "task.json").read_text())
    assert config["base_classes"] == task["base_classes"]
    assert "PASSED" in printed  # fvgpt validate on the exported bundle
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    assert {c["name"] for c in manifest["classes"] if c["base"]} == set(task["base_classes"])  # in folder order
    assert main(["demo", "--quick", "--no-serve", "--out", str(out)]) == 0  # re-running reuses what is there
