"""The two training stages (docs/method.md, "Training"): stage 1 ("prompt") trains the stage-1 learner (CoOp/KgCoOp
context, PromptSRC prompts, MMRL representation) on the base classes; stage 2 ("plugin") trains the FVG-PT plugin with
the backbone, the learner and zero-shot CLIP frozen. Both run the model object's objectives (fvgpt.model).

Resumable at epoch granularity: after every epoch the trainable weights, the optimiser state (and PromptSRC's running
Gaussian prompt aggregate) go to `state/<stage>.pt`, and each epoch reseeds every random source from (seed, stage,
epoch), so an interrupted and resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .backbone import load_backbone
from .classes import ClassSplit
from .config import TrainConfig
from .data import DatasetIndex, FewShotDataset, collate, index_for, train_transform
from .model import FVGPTModel
from .progress import note, track
from .promptsrc import PromptAverage
from .rundir import (BackboneRecord, RunDirError, atomic_save_tensors, atomic_torch_save, atomic_write_json,
                     check_weights_source, read_classes, read_config, read_json, read_learner, stage_done,
                     write_config)

EpochHook = Callable[[str, int], None]
STAGES = ("prompt", "plugin")
ADAM_BETAS = (0.9, 0.999)  # Dassl's AdamW defaults (MMRL's config)
_STAGE_SEED = {"prompt": 1, "plugin": 2}


def prepare_run_dir(cfg: TrainConfig, out: Path, stage: str, resume: bool) -> TrainConfig:
    """Create a new run dir, or reopen an existing one (its stored config wins: the run stays what it was)."""
    if (out / "config.json").is_file():
        if not resume:
            raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        stored, _ = read_config(out)
        stored.device, stored.workers = cfg.device, cfg.workers  # where it runs may change; what it is may not
        return stored
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} exists, is not empty and is not a run dir")
    if resume:
        raise RunDirError(f"--resume given but {out} holds no run")
    if stage == "plugin":
        raise RunDirError("--stage plugin needs a run dir whose prompt stage has finished")
    return cfg


def _seed(cfg: TrainConfig, stage: str, epoch: int) -> torch.Generator:
    """Seed every random source from (seed, stage, epoch): initialisation uses epoch -1, epoch e uses e."""
    seed = cfg.seed * 100_003 + _STAGE_SEED[stage] * 1_009 + epoch
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _lr_at(cfg: TrainConfig, lr: float, epoch: int, epochs: int) -> float:
    """Dassl schedule: constant warm-up LR for the first epoch(s), then cosine over all epochs."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))


def _optimizer(cfg: TrainConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (Dassl's default, CoOp/KgCoOp/PromptSRC) or AdamW (MMRL), with the config's weight decay."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=ADAM_BETAS, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _run_stage(stage: str, cfg: TrainConfig, out: Path, trainable: nn.Module, epochs: int, lr: float,
               loader_for: Callable[[torch.Generator], torch.utils.data.DataLoader],
               step: Callable[[dict], dict[str, torch.Tensor]], hook: EpochHook | None, progress: bool,
               average: PromptAverage | None = None) -> None:
    """`average`: accumulate the weights after every epoch and end on the aggregate (PromptSRC's GPA)."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = _optimizer(cfg, params, lr)
    state_path = out / "state" / f"{stage}.pt"
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location=cfg.device, weights_only=True)
        trainable.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        if average is not None:
            average.load_state_dict(state["average"])
    for epoch in range(start, epochs):
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, lr, epoch, epochs)
        loader = loader_for(_seed(cfg, stage, epoch))
        sums: dict[str, float] = {}
        n, dropped, t0 = 0, 0, time.perf_counter()
        bar = track(loader, f"{stage} {epoch + 1}/{epochs}", progress, unit="batch")
        for batch in bar:
            dropped += batch.pop("dropped")
            if not batch:
                continue
            parts = step(batch)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            bs = batch["label"].shape[0]
            n += bs
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * bs
            bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
        if n == 0:
            raise RunDirError(f"{stage}: no training image could be read")
        seconds = time.perf_counter() - t0
        record = {"stage": stage, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "images": n,
                  "seconds": round(seconds, 3), "images_per_s": round(n / seconds, 2), "dropped": dropped}
        record |= {k: round(v / n, 6) for k, v in sums.items()}
        if average is not None:
            average.add(epoch, trainable.state_dict())
        atomic_torch_save(state_path, {"weights": trainable.state_dict(), "optimizer": opt.state_dict(),
                                       "epoch": epoch + 1}
                          | ({"average": average.state_dict()} if average is not None else {}))
        with open(out / "train_log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        _set_progress(out, stage, epoch + 1, done=False)
        if progress:
            note(f"{stage} epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f} "
                 f"({record['images_per_s']:.1f} img/s)")
        if hook is not None:
            hook(stage, epoch + 1)
    if average is not None:
        trainable.load_state_dict(average.result())
    _set_progress(out, stage, epochs, done=True)


def _set_progress(out: Path, stage: str, epochs_done: int, done: bool) -> None:
    doc = read_json(out / "progress.json")
    doc[stage] = {"epochs_done": epochs_done, "done": done}
    atomic_write_json(out / "progress.json", doc)


def _base_loader(model: FVGPTModel, index: DatasetIndex, augment: bool, batch: int):
    """Loader factory over the base-class training images; targets are positions among the base classes."""
    cfg, classes = model.cfg, model.classes
    samples = [s for s in index.train if classes.base[s.label]]
    dataset = FewShotDataset(samples, train_transform(model.backbone.preprocess, augment, cfg.crop_scale))
    position = torch.tensor(classes.position, device=model.backbone.device)

    def loader_for(gen: torch.Generator) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, generator=gen,
                                           collate_fn=collate, num_workers=cfg.workers, drop_last=False)

    return loader_for, lambda labels: position[labels.to(model.backbone.device)]


def train_prompt(model: FVGPTModel, out: Path, index: DatasetIndex, hook: EpochHook | None = None,
                 progress: bool = True) -> None:
    """Stage 1: the learner of cfg.method on the base classes (PromptSRC: ending on its Gaussian prompt aggregate)."""
    cfg, dev = model.cfg, model.backbone.device
    base = model.classes.base_names
    teacher = model.prompt.teacher(model, base)
    loader_for, targets = _base_loader(model, index, cfg.prompt_augment, cfg.prompt_batch)
    average = PromptAverage.for_config(cfg) if cfg.method == "promptsrc" else None

    def step(batch: dict) -> dict[str, torch.Tensor]:
        return model.prompt_loss(batch["img"].to(dev), targets(batch["label"]), base, teacher)

    _run_stage("prompt", cfg, out, model.prompt, cfg.prompt_epochs, cfg.prompt_lr, loader_for, step, hook, progress,
               average)
    atomic_save_tensors(out / "prompt.safetensors", model.prompt.state_dict(), {"method": cfg.method})


def train_plugin(model: FVGPTModel, out: Path, index: DatasetIndex, fdc_logit_scale: float,
                 hook: EpochHook | None = None, progress: bool = True) -> None:
    """Stage 2: FRG + FDC + Prior Calibration (E1–E14) on the base data; only the plugin's parameters train."""
    cfg, dev = model.cfg, model.backbone.device
    model.prompt.requires_grad_(False)
    tables = model.tables(model.classes.base_names)
    _seed(cfg, "plugin", -1)
    plugin = model.new_plugin(fdc_logit_scale)
    loader_for, targets = _base_loader(model, index, True, cfg.plugin_batch)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        return model.plugin_loss(batch["img"].to(dev), batch["mask"].to(dev), batch["has_mask"].to(dev),
                                 targets(batch["label"]), tables)

    _run_stage("plugin", cfg, out, plugin, cfg.plugin_epochs, cfg.plugin_lr, loader_for, step, hook, progress)
    atomic_save_tensors(out / "plugin.safetensors", plugin.state_dict())


def train(cfg: TrainConfig, out: str | Path, stage: str = "all", resume: bool = False,
          hook: EpochHook | None = None, progress: bool = True) -> Path:
    """Run the requested stage(s) ("prompt", "plugin" or "all") into `out`; a finished stage is never re-run."""
    out = Path(out)
    cfg = prepare_run_dir(cfg, out, stage, resume)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = index_for(cfg)  # before the weights load: a wrong path fails in a second, not after a download
    for w in caught:
        note(f"warning: {w.message}")
    if (out / "config.json").is_file():
        check_weights_source(out, cfg)
    backbone = load_backbone(cfg.model, cfg.pretrained, cfg.device, cfg.init_seed)
    if not (out / "config.json").is_file():
        classes = ClassSplit.paper(index.classnames, cfg.base_classes)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "classes.json", classes.records())
        atomic_write_json(out / "data.json", index.describe() | {
            "shots": cfg.shots, "seed": cfg.seed, "warnings": index.warnings,
            "train": [[str(s.path), s.label, s.mask is not None] for s in index.train]})
        atomic_write_json(out / "progress.json", {})
        write_config(out, cfg, BackboneRecord.of(backbone, cfg))
    _, record = read_config(out)
    classes = read_classes(out)
    if backbone.fingerprint() != record.fingerprint:
        raise RunDirError(f"{out}: backbone weights differ from those this run started with")
    if stage in ("prompt", "all") and not stage_done(out, "prompt"):
        _seed(cfg, "prompt", -1)
        train_prompt(FVGPTModel.new_prompt(backbone, classes, cfg), out, index, hook, progress)
    elif not stage_done(out, "prompt"):
        raise RunDirError(f"{out}: the prompt stage has not finished; run --stage prompt or all first")
    if stage in ("plugin", "all") and not stage_done(out, "plugin"):
        prompt = read_learner(out, backbone, cfg)
        train_plugin(FVGPTModel(backbone, classes, cfg, prompt), out, index, record.fdc_logit_scale, hook, progress)
    return out
