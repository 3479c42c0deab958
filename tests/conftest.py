"""Shared fixtures: a generated dataset, a tiny trained run and its bundles, built once per test session.

Everything is offline and CPU-only: fvgpt-tiny is randomly initialised (deterministic from its init seed).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="fvgpt-bentoml-"))

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


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """fp32 FVG-PT bundle exported from tiny_run. Treat as read-only."""
    from fvgpt_export.build import ExportOptions, export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("bundles") / "fvgpt", ExportOptions(progress=False,
                                                                                           parity_images=32))


@pytest.fixture(scope="session")
def tiny_zero_shot_bundle(tmp_path_factory) -> Path:
    """Zero-shot bundle of plain fvgpt-tiny with three labels. Treat as read-only."""
    from fvgpt_export.build import ExportOptions, export_zero_shot

    return export_zero_shot("fvgpt-tiny", "none", ["cat", "dog", "rocket"],
                            tmp_path_factory.mktemp("bundles") / "zeroshot", ExportOptions(progress=False,
                                                                                           parity_images=32))


@pytest.fixture(scope="session")
def tiny_openvino_bundle(tiny_run, tmp_path_factory) -> Path:
    """int8 FVG-PT bundle from tiny_run with the OpenVINO variants (fp32, bf16 where the CPU has it, NNCF int8).
    Treat as read-only, except for its tuning profile."""
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install '.[openvino]')")
    from fvgpt_export.build import ExportOptions, export_run

    return export_run(tiny_run, tmp_path_factory.mktemp("bundles") / "openvino",
                      ExportOptions(precision="int8", openvino=True, progress=False, parity_images=16,
                                    calibration_images=16))
