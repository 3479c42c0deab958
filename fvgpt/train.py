"""The two training stages (DESIGN.md): stage 1 tunes the CoOp/KgCoOp context on the base classes; stage 2 trains
the FVG-PT plugin with backbone, prompt and zero-shot CLIP frozen.

Resumable at epoch granularity: after every epoch the trainable weights and optimiser state go to
`state/<stage>.pt`, and each epoch reseeds every random source from (seed, stage, epoch), so an interrupted and
resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .backbone import Backbone, TextEncoder, load_backbone
from .config import TrainConfig
from .data import (DatasetIndex, FewShotDataset, collate, foreground_view, load_index, split_base_new,
                   train_transform)
from .losses import LossWeights, fvgpt_loss
from .plugin import FVGPTPlugin
from .prompts import PromptLearner, encode_prompts, kgcoop_loss
from .rundir import (RunDirError, atomic_save_tensors, atomic_torch_save, atomic_write_json, build_plugin, read_json,
                     read_tensors)

EpochHook = Callable[[str, int], None]
_STAGE_SEED = {"backbone": 1, "plugin": 2}


def resolve_base_flags(cfg: TrainConfig, classnames: list[str]) -> list[bool]:
    if cfg.base_classes is None:
        return split_base_new(len(classnames))
    unknown = [c for c in cfg.base_classes if c not in classnames]
    if unknown:
        raise ValueError(f"--base-classes names unknown classes: {unknown}")
    return split_base_new(len(classnames), [classnames.index(c) for c in cfg.base_classes])


def _backbone_info(backbone: Backbone, cfg: TrainConfig) -> dict:
    return {"embed_dim": backbone.embed_dim, "logit_scale": backbone.logit_scale,
            "fdc_logit_scale": cfg.fdc_logit_scale or backbone.logit_scale,
            "context_length": backbone.context_length, "preprocess": backbone.preprocess.to_dict(),
            "fingerprint": backbone.fingerprint(), "torch": torch.__version__, "open_clip": open_clip.__version__}


def prepare_run_dir(cfg: TrainConfig, out: Path, stage: str, resume: bool) -> TrainConfig:
    """Create a new run dir, or reopen an existing one (its stored config wins: the run stays what it was)."""
    if (out / "config.json").is_file():
        if not resume:
            raise RunDirError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        stored = TrainConfig.from_dict(read_json(out / "config.json")["train"])
        stored.device, stored.workers = cfg.device, cfg.workers  # where it runs may change; what it is may not
        return stored
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out} exists, is not empty and is not a run dir")
    if resume:
        raise RunDirError(f"--resume given but {out} holds no run")
    if stage == "plugin":
        raise RunDirError("--stage plugin needs a run dir whose backbone stage has finished")
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


def _run_stage(stage: str, cfg: TrainConfig, out: Path, module: nn.Module, epochs: int, lr: float,
               loader_for: Callable[[torch.Generator], torch.utils.data.DataLoader],
               step: Callable[[dict], dict[str, torch.Tensor]], hook: EpochHook | None, progress: bool) -> None:
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    state_path = out / "state" / f"{stage}.pt"
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location=cfg.device, weights_only=True)
        module.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
    for epoch in range(start, epochs):
        for g in opt.param_groups:
            g["lr"] = _lr_at(cfg, lr, epoch, epochs)
        loader = loader_for(_seed(cfg, stage, epoch))
        sums: dict[str, float] = {}
        n, dropped, t0 = 0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"{stage} {epoch + 1}/{epochs}", disable=not progress, leave=False)
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
        atomic_torch_save(state_path, {"weights": module.state_dict(), "optimizer": opt.state_dict(),
                                       "epoch": epoch + 1})
        with open(out / "train_log.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        progress_doc = read_json(out / "progress.json")
        progress_doc[stage] = {"epochs_done": epoch + 1, "done": False}
        atomic_write_json(out / "progress.json", progress_doc)
        if progress:
            tqdm.write(f"{stage} epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f} "
                       f"({record['images_per_s']:.1f} img/s)")
        if hook is not None:
            hook(stage, epoch + 1)


def _mark_done(out: Path, stage: str, epochs: int) -> None:
    doc = read_json(out / "progress.json")
    doc[stage] = {"epochs_done": epochs, "done": True}
    atomic_write_json(out / "progress.json", doc)


def _loader(dataset, batch: int, cfg: TrainConfig, gen: torch.Generator) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, generator=gen, collate_fn=collate,
                                       num_workers=cfg.workers, drop_last=False)


def train_backbone(cfg: TrainConfig, out: Path, backbone: Backbone, index: DatasetIndex, base_flags: list[bool],
                   hook: EpochHook | None = None, progress: bool = True) -> torch.Tensor:
    """Stage 1: CoOp / KgCoOp context on the base classes; returns the learned context (n_ctx, width)."""
    base_ids = [i for i, b in enumerate(base_flags) if b]
    pos = {c: i for i, c in enumerate(base_ids)}
    base_labels = [index.classnames[i] for i in base_ids]
    samples = [s for s in index.train if base_flags[s.label]]
    dataset = FewShotDataset(samples, train_transform(backbone.preprocess, cfg.backbone_augment, cfg.crop_scale))
    _seed(cfg, "backbone", -1)
    learner = PromptLearner(backbone, cfg.n_ctx, cfg.ctx_init).to(backbone.device)
    encoder = TextEncoder(backbone)
    scale = backbone.logit_scale
    remap = torch.tensor([pos.get(i, -1) for i in range(len(base_flags))], device=backbone.device)
    zero_shot = None
    if cfg.method == "kgcoop":
        with torch.no_grad():
            zero_shot = encode_prompts(encoder, backbone, base_labels, None)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        f = backbone.encode_images(batch["img"].to(backbone.device))
        text = encode_prompts(encoder, backbone, base_labels, learner.ctx)
        labels = remap[batch["label"].to(backbone.device)]
        ce = F.cross_entropy(scale * f @ text.t(), labels)
        if zero_shot is None:
            return {"loss": ce, "ce": ce.detach()}
        kg = kgcoop_loss(text, zero_shot)
        return {"loss": ce + cfg.kg_weight * kg, "ce": ce.detach(), "kg": kg.detach()}

    _run_stage("backbone", cfg, out, learner, cfg.backbone_epochs, cfg.backbone_lr,
               lambda g: _loader(dataset, cfg.backbone_batch, cfg, g), step, hook, progress)
    atomic_save_tensors(out / "prompt.safetensors", {"ctx": learner.ctx},
                        {"method": cfg.method, "n_ctx": str(cfg.n_ctx)})
    _mark_done(out, "backbone", cfg.backbone_epochs)
    return learner.ctx.detach()


def train_plugin(cfg: TrainConfig, out: Path, backbone: Backbone, index: DatasetIndex, base_flags: list[bool],
                 ctx: torch.Tensor, info: dict, hook: EpochHook | None = None, progress: bool = True) -> FVGPTPlugin:
    """Stage 2: FRG + FDC + Prior Calibration (E1–E14) on the base data; only the plugin's parameters train."""
    dev = backbone.device
    base_ids = [i for i, b in enumerate(base_flags) if b]
    pos = {c: i for i, c in enumerate(base_ids)}
    base_labels = [index.classnames[i] for i in base_ids]
    samples = [s for s in index.train if base_flags[s.label]]
    dataset = FewShotDataset(samples, train_transform(backbone.preprocess, augment=True, crop_scale=cfg.crop_scale))
    encoder = TextEncoder(backbone)
    with torch.no_grad():
        tuned = encode_prompts(encoder, backbone, base_labels, ctx)
        clip = encode_prompts(encoder, backbone, base_labels, None)
    _seed(cfg, "plugin", -1)
    plugin = build_plugin(cfg, backbone.embed_dim, float(info["fdc_logit_scale"])).to(dev)
    weights = LossWeights(lambda_d=cfg.lambda_d, lambda_rg=cfg.lambda_rg, lambda_new=cfg.lambda_new,
                          use_pc_kl=cfg.pc_kl)
    scale = backbone.logit_scale
    remap = torch.tensor([pos.get(i, -1) for i in range(len(base_flags))], device=dev)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        img, masks = batch["img"].to(dev), batch["mask"].to(dev)
        x_fg = foreground_view(img, masks, backbone.preprocess, cfg.fg_fill)
        # one frozen pass over x and x_fg together; f also serves zero-shot CLIP (shared tower for CoOp/KgCoOp)
        f, f_fg = backbone.encode_images(torch.cat([img, x_fg])).split(img.shape[0])
        z_full, z_fg, z_clip = scale * f @ tuned.t(), scale * f_fg @ tuned.t(), scale * f @ clip.t()
        return fvgpt_loss(plugin, f, tuned, z_full, z_fg, z_clip, masks.mean(dim=(1, 2, 3)),
                          batch["has_mask"].to(dev), remap[batch["label"].to(dev)], weights)

    _run_stage("plugin", cfg, out, plugin, cfg.plugin_epochs, cfg.plugin_lr,
               lambda g: _loader(dataset, cfg.plugin_batch, cfg, g), step, hook, progress)
    atomic_save_tensors(out / "plugin.safetensors", plugin.state_dict())
    _mark_done(out, "plugin", cfg.plugin_epochs)
    return plugin


def train(cfg: TrainConfig, out: str | Path, stage: str = "all", resume: bool = False,
          hook: EpochHook | None = None, progress: bool = True) -> Path:
    """Run the requested stage(s) into `out`; a finished stage is never re-run."""
    out = Path(out)
    cfg = prepare_run_dir(cfg, out, stage, resume)
    backbone = load_backbone(cfg.model, cfg.pretrained, cfg.device, cfg.init_seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = load_index(cfg.data, cfg.shots, cfg.seed, cfg.split_file, cfg.image_dir, cfg.test_fraction)
    for w in caught:
        tqdm.write(f"warning: {w.message}")
    base_flags = resolve_base_flags(cfg, index.classnames)
    if not (out / "config.json").is_file():
        info = _backbone_info(backbone, cfg)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "classes.json", [{"name": c, "base": b} for c, b in zip(index.classnames, base_flags)])
        atomic_write_json(out / "data.json", {"layout": index.layout, "root": str(index.root),
                                              "train": [[str(s.path), s.label, s.mask is not None]
                                                        for s in index.train],
                                              "warnings": index.warnings})
        atomic_write_json(out / "progress.json", {})
        atomic_write_json(out / "config.json", {"train": json.loads(cfg.to_json()), "backbone": info})
    info = read_json(out / "config.json")["backbone"]
    if backbone.fingerprint() != info["fingerprint"]:
        raise RunDirError(f"{out}: backbone weights differ from those this run started with")
    progress_doc = read_json(out / "progress.json")
    if stage in ("backbone", "all") and not progress_doc.get("backbone", {}).get("done"):
        ctx = train_backbone(cfg, out, backbone, index, base_flags, hook, progress)
    elif progress_doc.get("backbone", {}).get("done"):
        ctx = read_tensors(out / "prompt.safetensors")["ctx"].to(cfg.device)
    else:
        raise RunDirError(f"{out}: the backbone stage has not finished; run --stage backbone or all first")
    if stage in ("plugin", "all") and not progress_doc.get("plugin", {}).get("done"):
        train_plugin(cfg, out, backbone, index, base_flags, ctx, info, hook, progress)
    return out

