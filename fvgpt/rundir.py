"""The run dir written by `fvgpt train`: self-describing and versioned (docs/run-dir.md).

  config.json         {"schema_version", "train": every TrainConfig field, "backbone": BackboneRecord}
  classes.json        [{"name", "base"}] in label order
  data.json           layout, root and the K-shot training files
  prompt.safetensors  {"ctx": (n_ctx, width)}                          (stage 1, "prompt")
  plugin.safetensors  FVGPTPlugin state dict                            (stage 2, "plugin")
  progress.json       per-stage epochs done (resume bookkeeping)
  state/<stage>.pt    optimiser + weights at the last finished epoch (tensors only; loaded with weights_only=True)
  metrics.json        evaluation (Base, New, HM, D_fg per model) and what it was computed from
  train_log.jsonl     one JSON line per epoch
Every file is written atomically (temp file in the same folder, then rename).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .backbone import Backbone, load_backbone
from .classes import ClassSplit
from .config import CONFIG_SCHEMA, DATA_SOURCE, ConfigError, TrainConfig, config_json
from .errors import FVGPTError
from .model import LEARNERS, FVGPTModel
from .preprocess import Preprocess


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


@dataclass(frozen=True)
class BackboneRecord:
    """Facts about the frozen backbone, recorded when a run starts and checked whenever it is rebuilt."""

    embed_dim: int
    logit_scale: float
    fdc_logit_scale: float
    context_length: int
    preprocess: Preprocess
    fingerprint: str  # sha256 over every weight (Backbone.fingerprint)
    torch: str
    open_clip: str

    @classmethod
    def of(cls, backbone: Backbone, cfg: TrainConfig) -> BackboneRecord:
        stage_one_scale = cfg.mmrl_scale if cfg.method == "mmrl" else backbone.logit_scale  # S defaults to s_b
        return cls(backbone.embed_dim, backbone.logit_scale, cfg.fdc_logit_scale or stage_one_scale,
                   backbone.context_length, backbone.preprocess, backbone.fingerprint(), torch.__version__,
                   open_clip.__version__)

    def to_dict(self) -> dict:
        return asdict(self) | {"preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> BackboneRecord:
        try:
            return cls(**(d | {"preprocess": Preprocess.from_dict(d["preprocess"])}))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"backbone record is incomplete or has unknown keys ({exc})") from None


def write_config(out: Path, cfg: TrainConfig, record: BackboneRecord) -> None:
    atomic_write_bytes(out / "config.json", (config_json(cfg, record.to_dict()) + "\n").encode())


def read_config(run_dir: Path) -> tuple[TrainConfig, BackboneRecord]:
    raw = read_json(run_dir / "config.json")
    if not isinstance(raw, dict) or "train" not in raw:
        raise RunDirError(f"{run_dir / 'config.json'} is not a fvgpt run config")
    if raw.get("schema_version") != CONFIG_SCHEMA:
        raise RunDirError(f"{run_dir} was written by another version of fvgpt (config schema "
                          f"{raw.get('schema_version', 1)}, this version reads {CONFIG_SCHEMA}); train it again")
    try:
        return TrainConfig.from_dict(raw["train"]), BackboneRecord.from_dict(raw["backbone"])
    except ConfigError as exc:
        raise RunDirError(f"{run_dir / 'config.json'}: {exc}") from None


def read_classes(run_dir: Path) -> ClassSplit:
    return ClassSplit.from_records(read_json(run_dir / "classes.json"))


def stage_done(run_dir: Path, stage: str) -> bool:
    progress = read_json(run_dir / "progress.json") if (run_dir / "progress.json").is_file() else {}
    return bool(progress.get(stage, {}).get("done"))


def evaluation_stamp(run_dir: Path, cfg: TrainConfig) -> dict:
    """What a run's metrics are computed from: the sha256 of its learned weights and the data source evaluated on.
    Stored in metrics.json, it tells `fvgpt eval` whether the stored metrics are still the run's."""
    weights = {}
    for name in ("prompt.safetensors", "plugin.safetensors"):
        if (run_dir / name).is_file():
            weights[name] = hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
    return {"weights": weights, "data": {k: getattr(cfg, k) for k in DATA_SOURCE}}


def check_weights_source(run_dir: Path, cfg: TrainConfig) -> None:
    """Runs written before fvgpt stored --pretrained resolved may name their checkpoint relative to the folder they
    were trained in, which is not recorded: say so instead of guessing (the fingerprint would catch a wrong guess)."""
    source = cfg.pretrained
    if source.lower() == "none" or os.path.isabs(source) or Path(source).is_file() or \
            source in open_clip.list_pretrained_tags_by_model(cfg.model):
        return
    raise RunDirError(f"{run_dir / 'config.json'} names its checkpoint {source!r} relative to the folder the run "
                      f"was trained in (older fvgpt stored --pretrained as given), and {Path.cwd()} has no such file; "
                      f"run from that folder, or write the checkpoint's absolute path into config.json's "
                      f"\"pretrained\"")


def read_learner(run_dir: Path, backbone: Backbone, cfg: TrainConfig) -> nn.Module:
    """The run's trained stage-1 learner (prompt.safetensors: its state dict) on `backbone`."""
    tensors = read_tensors(run_dir / "prompt.safetensors")
    try:
        return LEARNERS[cfg.method].from_state(backbone, cfg, tensors)
    except FVGPTError:  # the backbone's own problem, said as it is
        raise
    except (KeyError, RuntimeError) as exc:
        raise RunDirError(f"{run_dir / 'prompt.safetensors'} does not hold a {cfg.method} learner for this config "
                          f"({type(exc).__name__}: {exc})") from None


@dataclass
class Run:
    """A trained run, rebuilt from its run dir."""

    path: Path
    config: TrainConfig
    record: BackboneRecord
    model: FVGPTModel

    @property
    def classes(self) -> ClassSplit:
        return self.model.classes


def load_run(path: str | Path, device: str = "cpu", require_plugin: bool = False) -> Run:
    """Rebuild a run's model (backbone + learned prompt + plugin) and check the backbone is the one it was trained
    on."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run dir {path} does not exist")
    cfg, record = read_config(path)
    cfg.device = device
    classes = read_classes(path)
    if not stage_done(path, "prompt"):
        raise RunDirError(f"{path}: stage 1 (prompt) has not finished; run `fvgpt train --resume --out {path}`")
    check_weights_source(path, cfg)
    backbone = load_backbone(cfg.model, cfg.pretrained, device, cfg.init_seed)
    if backbone.fingerprint() != record.fingerprint:
        raise RunDirError(f"{path}: the {cfg.model} weights from {cfg.pretrained!r} differ from those the run was "
                          f"trained on (fingerprint mismatch; different checkpoint or torch version?)")
    model = FVGPTModel(backbone, classes, cfg, read_learner(path, backbone, cfg).requires_grad_(False))
    if stage_done(path, "plugin"):
        plugin = model.new_plugin(record.fdc_logit_scale)
        try:
            plugin.load_state_dict(read_tensors(path / "plugin.safetensors"))
        except RuntimeError as exc:
            raise RunDirError(f"{path / 'plugin.safetensors'} does not match the config ({exc})") from exc
        plugin.eval().requires_grad_(False)
    elif require_plugin:
        raise RunDirError(f"{path}: stage 2 (plugin) has not finished; run `fvgpt train --resume --out {path}`")
    return Run(path, cfg, record, model.eval())
