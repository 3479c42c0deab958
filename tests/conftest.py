"""Shared fixtures: a generated dataset, a tiny trained run and its bundles, built once per test session.

Everything is offline and CPU-only: fvgpt-tiny is randomly initialised (deterministic from its init seed).
The serving and runtime tests also run in the torch-free install (`pip install '.[cpu,serve,dev]'`, CI's Python
3.12 and 3.13 legs): with FVGPT_TEST_BUNDLES=DIR the two bundles are taken from DIR/fvgpt and DIR/zeroshot when there,
and built into DIR otherwise (CI builds them once, on 3.11). A test that needs torch skips, saying so, without it.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="fvgpt-bentoml-"))
# A shell starts a background job with SIGINT ignored, and child processes inherit "ignored" (a handler they do not):
# restore Python's own, so the Ctrl-C tests interrupt their commands however the suite itself was started.
signal.signal(signal.SIGINT, signal.default_int_handler)

BUNDLES_ENV = "FVGPT_TEST_BUNDLES"
HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "open_clip"))
TORCH_MISSING = ("needs torch and open_clip, which this torch-free install lacks (they come with the `train` extra: "
                 "pip install '.[train,cpu,serve,bench,dev]')")
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason=TORCH_MISSING)

TINY_CLASSES = ["red circle", "green square", "blue triangle", "yellow cross", "purple circle", "red square"]


def tiny_config(data: Path, **overrides):
    from fvgpt.config import TrainConfig

    base = dict(data=str(data), model="fvgpt-tiny", pretrained="none", shots=4, prompt_epochs=2, plugin_epochs=2,
                prompt_lr=0.02, plugin_lr=0.02, prompt_batch=4, plugin_batch=4, eval_batch=32)
    return TrainConfig(**(base | overrides))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from fvgpt.demo_data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("data") / "shapes", per_class=10, classes=TINY_CLASSES,
                             size=64)


@pytest.fixture(scope="module")
def backbone():
    """The random-weight fvgpt-tiny backbone, one per test module (tests may train on it)."""
    from fvgpt.backbone import load_backbone

    return load_backbone("fvgpt-tiny", "none")


@pytest.fixture(scope="module")
def index(demo_data):
    """The demo data's 2-shot, seed-1 split."""
    from fvgpt.data import load_index

    return load_index(demo_data, shots=2, seed=1)


@pytest.fixture(scope="session")
def tiny_run(demo_data, tmp_path_factory) -> Path:
    """A finished two-stage run on fvgpt-tiny (3 base, 3 new classes). Treat as read-only."""
    from fvgpt.train import train

    return train(tiny_config(demo_data), tmp_path_factory.mktemp("runs") / "tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_run_seed2(demo_data, tmp_path_factory) -> Path:
    """Another run on the same backbone (other K-shot draw and seed): another classifier, the same tower."""
    from fvgpt.train import train

    return train(tiny_config(demo_data, seed=2, prompt_epochs=1, plugin_epochs=1),
                 tmp_path_factory.mktemp("runs") / "tiny-seed2", progress=False)


def _bundle(name: str, build, tmp_path_factory) -> Path:
    """DIR/<name> from FVGPT_TEST_BUNDLES when it holds one; else built (into DIR when the variable is set)."""
    shared = os.environ.get(BUNDLES_ENV)
    if shared and (Path(shared) / name / "manifest.json").is_file():
        return Path(shared) / name
    if not HAVE_TORCH:
        pytest.skip(f"no prebuilt bundle at ${BUNDLES_ENV}/{name} ({shared or 'unset'}), and building one "
                    f"{TORCH_MISSING}")
    return build(Path(shared) / name if shared else tmp_path_factory.mktemp("bundles") / name)


@pytest.fixture(scope="session")
def tiny_bundle(request, tmp_path_factory) -> Path:
    """fp32 FVG-PT bundle exported from tiny_run. Treat as read-only."""

    def build(out: Path) -> Path:
        from fvgpt_export.build import ExportOptions, export_run

        return export_run(request.getfixturevalue("tiny_run"), out, ExportOptions(progress=False, parity_images=32))

    return _bundle("fvgpt", build, tmp_path_factory)


@pytest.fixture(scope="session")
def promptsrc_run(demo_data, tmp_path_factory) -> Path:
    """A finished two-stage PromptSRC run on fvgpt-tiny (the backbone of tiny_run). Treat as read-only."""
    from fvgpt.train import train

    return train(tiny_config(demo_data, method="promptsrc", prompt_epochs=1, plugin_epochs=1),
                 tmp_path_factory.mktemp("runs") / "promptsrc", progress=False)


@pytest.fixture(scope="session")
def mmrl_run(demo_data, tmp_path_factory) -> Path:
    """A finished two-stage MMRL run on fvgpt-tiny, its representation tokens from layer 2 (a one-block trunk). Treat
    as read-only."""
    from fvgpt.train import train

    return train(tiny_config(demo_data, method="mmrl", rep_layer=2, rep_dim=32, prompt_epochs=1, plugin_epochs=1),
                 tmp_path_factory.mktemp("runs") / "mmrl", progress=False)


@pytest.fixture(scope="session")
def promptsrc_bundle(request, tmp_path_factory) -> Path:
    """fp32 bundle of promptsrc_run: CLIP's tower (tiny_bundle's) beside its prompted tower. Read-only."""

    def build(out: Path) -> Path:
        from fvgpt_export.build import ExportOptions, export_run

        return export_run(request.getfixturevalue("promptsrc_run"), out,
                          ExportOptions(progress=False, parity_images=16))

    return _bundle("promptsrc", build, tmp_path_factory)


@pytest.fixture(scope="session")
def mmrl_bundle(request, tmp_path_factory) -> Path:
    """int8 bundle of mmrl_run: trunk, CLIP branch, MMRL branch. Read-only."""

    def build(out: Path) -> Path:
        from fvgpt_export.build import ExportOptions, export_run

        return export_run(request.getfixturevalue("mmrl_run"), out,
                          ExportOptions(precision="int8", progress=False, parity_images=16))

    return _bundle("mmrl", build, tmp_path_factory)


@pytest.fixture(scope="session")
def second(request, tmp_path_factory) -> dict[str, Path]:
    """A second PromptSRC and a second MMRL classifier on the backbone: the runs' learners and plugins moved by noise,
    exported (fp32). Read-only."""

    def builder(name: str):
        def build(out: Path) -> Path:
            import torch
            from fvgpt_export.build import ExportOptions, export_model

            from fvgpt.rundir import load_run

            model = load_run(request.getfixturevalue(f"{name}_run")).model
            with torch.no_grad():
                for p in [*model.prompt.parameters(), *model.plugin.parameters()]:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
            return export_model(model, out, ExportOptions(progress=False, parity_images=4), "none", 0)

        return build

    return {name: _bundle(f"{name}-second", builder(name), tmp_path_factory) for name in ("promptsrc", "mmrl")}


@pytest.fixture(scope="session")
def tiny_zero_shot_bundle(tmp_path_factory) -> Path:
    """Zero-shot bundle of plain fvgpt-tiny with three labels. Treat as read-only."""

    def build(out: Path) -> Path:
        from fvgpt_export.build import ExportOptions, export_zero_shot

        return export_zero_shot("fvgpt-tiny", "none", ["cat", "dog", "rocket"], out,
                                ExportOptions(progress=False, parity_images=32))

    return _bundle("zeroshot", build, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_explain_bundle(request, tmp_path_factory) -> Path:
    """tiny_run exported with its explain graph (fp32). Treat as read-only."""

    def build(out: Path) -> Path:
        from fvgpt_export.build import ExportOptions, export_run

        return export_run(request.getfixturevalue("tiny_run"), out,
                          ExportOptions(progress=False, parity_images=16, explain=True))

    return _bundle("fvgpt-explain", build, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_bundle_seed2(request, tmp_path_factory) -> Path:
    """fp32 FVG-PT bundle exported from tiny_run_seed2: another classifier on tiny_bundle's tower. Read-only."""

    def build(out: Path) -> Path:
        from fvgpt_export.build import ExportOptions, export_run

        return export_run(request.getfixturevalue("tiny_run_seed2"), out,
                          ExportOptions(progress=False, parity_images=32))

    return _bundle("fvgpt-seed2", build, tmp_path_factory)


@pytest.fixture(scope="session")
def generated_repository(tmp_path_factory) -> Path:
    """benchmarks.model_repository's generator: three classifiers on another tower (fvgpt-tiny, init seed 1),
    DIR/clf-000i/1. Read-only."""
    if not HAVE_TORCH:
        pytest.skip(f"generating a repository {TORCH_MISSING}")
    from benchmarks.model_repository import generate

    out = tmp_path_factory.mktemp("generated") / "repo"
    generate(out, 3, "fvgpt-tiny", "none", init_seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def world_run(tmp_path_factory) -> Path:
    """A finished two-stage run of the pretrained micro-CLIP (the committed checkpoint) on a small world task (4 base,
    4 new classes) of world v1's images (no distractor, white light). Its logits are decided, unlike the random
    fvgpt-tiny's near-ties or world v2's images, whose distractors and cast leave near-ties that an int8 tower flips,
    so an int8 tower's top-1 can be held to the gate. Treat as read-only."""
    if not HAVE_TORCH:
        pytest.skip(f"training {TORCH_MISSING}")
    from fvgpt.config import TrainConfig
    from fvgpt.train import train
    from fvgpt.world import TaskSpec, base_classes, make_task
    from fvgpt.world import world_train_settings
    from fvgpt.world_clip import verified_checkpoint

    spec = TaskSpec(classes=8, shots=4, test_images=32, correlation=0.5, distractors=0.0, light=0.0)
    task = make_task(tmp_path_factory.mktemp("world") / "task", spec)
    cfg = TrainConfig(**(world_train_settings(spec) | {"prompt_epochs": 2, "plugin_epochs": 2}), data=str(task),
                      pretrained=str(verified_checkpoint()), shots=4, base_classes=base_classes(task), eval_batch=64)
    return train(cfg, tmp_path_factory.mktemp("runs") / "world", progress=False)


@pytest.fixture(scope="session")
def tiny_openvino_bundle(request, tmp_path_factory) -> Path:
    """int8 FVG-PT bundle from world_run with the OpenVINO variants (fp32, bf16 where the CPU has it, NNCF int8).
    Treat as read-only, except for its tuning profile."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install '.[openvino]')")
    run = request.getfixturevalue("world_run")  # after the skip: a torch-free install has neither
    from fvgpt_export.build import ExportOptions, export_run

    return export_run(run, tmp_path_factory.mktemp("bundles") / "openvino",
                      ExportOptions(precision="int8", openvino=True, progress=False, parity_images=16,
                                    calibration_images=16))
