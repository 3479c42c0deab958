"""The run dir written by `fvgpt train`: self-describing, enough to rebuild the trained classifier.

  config.json         resolved TrainConfig + backbone facts (embed dim, logit scale, preprocessing, weight fingerprint)
  classes.json        [{"name", "base"}] in label order
  prompt.safetensors  {"ctx": (n_ctx, width)}                    (stage 1)
  plugin.safetensors  FVGPTPlugin state dict                      (stage 2)
  progress.json       per-stage epochs done (resume bookkeeping)
  state/<stage>.pt    optimiser + weights at the last finished epoch (tensors only; loaded with weights_only=True)
  metrics.json        evaluation (base, new, HM, D_fg)
  train_log.jsonl     one JSON line per epoch
Every file is written atomically (temp file in the same folder, then rename).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .backbone import Backbone, load_backbone
from .config import TrainConfig
from .errors import FVGPTError
from .plugin import FVGPTPlugin


class RunDirError(FVGPTError):
    pass


def _publish(tmp: str, path: Path) -> None:
    """Give the temp file normal permissions (mkstemp makes it 0600), then rename it into place atomically."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    _atomic(path, write)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    _atomic(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                                        metadata=metadata))


def atomic_torch_save(path: Path, obj) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def read_json(path: Path) -> dict | list:
    if not path.is_file():
        raise RunDirError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is corrupt ({exc})") from exc


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RunDirError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunDirError(f"{path} is corrupt ({exc})") from exc


@dataclass
class Run:
    """A trained run, rebuilt from its run dir."""

    path: Path
    config: TrainConfig
    info: dict  # backbone facts recorded at training time
    classnames: list[str]
    base_flags: list[bool]
    backbone: Backbone
    ctx: torch.Tensor
    plugin: FVGPTPlugin | None  # None until stage 2 has finished

    @property
    def fdc_logit_scale(self) -> float:
        return float(self.info["fdc_logit_scale"])


def build_plugin(cfg: TrainConfig, dim: int, logit_scale: float) -> FVGPTPlugin:
    return FVGPTPlugin(dim, cfg.bottleneck, cfg.gate_hidden, cfg.fdc_init_scale, logit_scale)


def load_run(path: str | Path, device: str = "cpu", require_plugin: bool = False) -> Run:
    """Rebuild a run (backbone + learned prompt + plugin) and check the backbone is the one it was trained on."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run dir {path} does not exist")
    raw = read_json(path / "config.json")
    if "train" not in raw or "backbone" not in raw:
        raise RunDirError(f"{path / 'config.json'} is not a fvgpt run config")
    cfg = TrainConfig.from_dict(raw["train"])
    info = raw["backbone"]
    classes = read_json(path / "classes.json")
    progress = read_json(path / "progress.json")
    if not progress.get("backbone", {}).get("done"):
        raise RunDirError(f"{path}: stage 1 (backbone) has not finished; run `fvgpt train --resume --out {path}`")
    backbone = load_backbone(cfg.model, cfg.pretrained, device, cfg.init_seed)
    if backbone.fingerprint() != info["fingerprint"]:
        raise RunDirError(f"{path}: the {cfg.model} weights from {cfg.pretrained!r} differ from those the run was "
                          f"trained on (fingerprint mismatch; different checkpoint or torch version?)")
    ctx = read_tensors(path / "prompt.safetensors")["ctx"].to(device)
    plugin = None
    if progress.get("plugin", {}).get("done"):
        plugin = build_plugin(cfg, backbone.embed_dim, float(info["fdc_logit_scale"])).to(device)
        try:
            plugin.load_state_dict(read_tensors(path / "plugin.safetensors"))
        except RuntimeError as exc:
            raise RunDirError(f"{path / 'plugin.safetensors'} does not match the config ({exc})") from exc
        plugin.eval().requires_grad_(False)
    elif require_plugin:
        raise RunDirError(f"{path}: stage 2 (plugin) has not finished; run `fvgpt train --resume --out {path}`")
    return Run(path, cfg, info, [c["name"] for c in classes], [bool(c["base"]) for c in classes], backbone, ctx, plugin)
