"""`fvgpt eval`: Base / New accuracy, HM and the foreground-shift index D_fg (E13) for zero-shot CLIP, the
prompt-tuned model and FVG-PT, from one pass over the test images (plus one over their foreground views).

Each model row reads its heads from the same forward (FVGPTModel.heads): Base accuracy is the row's base head over the
base classes on base test images, New accuracy its new head over the new classes on new test images (the paper's
split-selected evaluation). D_fg is the mean KL(p_full ‖ p_fg) of the base head on base test images with masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from .data import DataError, DatasetIndex, FewShotDataset, collate, eval_geometry, foreground_view
from .losses import trust_target
from .metrics import accuracy, foreground_shift, harmonic_mean
from .model import FVGPTModel
from .progress import track

D_FG_TAUS = (1, 2)


def model_rows(model: FVGPTModel) -> dict[str, tuple[str, str]]:
    """Model row → (base head, new head), as Heads attributes."""
    rows = {"zero-shot": ("z_clip", "z_clip"), model.cfg.method: ("z_full", "z_new")}
    if model.plugin is not None:
        rows["fvgpt"] = ("z_fdc", "z_pc")
    return rows


@dataclass
class EvalFeatures:
    """The frozen towers' features of every readable test image and of its foreground view, with labels and masks:
    everything evaluate() reads from the images. They depend only on the towers (`towers`: the backbone's, and the
    learner's when it has a tower of its own) and the foreground fill, so every model on those towers (CoOp, KgCoOp
    and their FVG-PT variants; a PromptSRC or MMRL run and its FVG-PT variants) can be scored on one pass."""

    towers: str
    f: torch.Tensor
    f_fg: torch.Tensor
    labels: torch.Tensor
    has_mask: torch.Tensor
    area: torch.Tensor
    dropped: int


@torch.no_grad()
def eval_features(model: FVGPTModel, index: DatasetIndex, batch_size: int, progress: bool) -> EvalFeatures:
    """One pass of the frozen tower over the test images and their foreground views (model.cfg.fg_fill)."""
    bb = model.backbone
    dataset = FewShotDataset(index.test, v2.Compose(eval_geometry(bb.preprocess)), image_transform=bb.eval_transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         num_workers=model.cfg.workers)
    feats, fg_feats, labels, has_mask, areas, dropped = [], [], [], [], [], 0
    for batch in track(loader, "eval", progress, unit="batch"):
        dropped += batch.pop("dropped")
        if not batch:
            continue
        img = batch["img"].to(bb.device)
        feats.append(model.encode_image(img))
        x_fg = foreground_view(img, batch["mask"].to(bb.device), bb.preprocess, model.cfg.fg_fill)
        fg_feats.append(model.encode_image(x_fg))
        labels.append(batch["label"].to(bb.device))
        has_mask.append(batch["has_mask"].to(bb.device))
        areas.append(batch["mask"].to(bb.device).mean(dim=(1, 2, 3)))
    if not feats:
        raise DataError(f"{index.root}: none of the {len(index.test)} test images could be read")
    return EvalFeatures(model.towers(), torch.cat(feats), torch.cat(fg_feats), torch.cat(labels),
                        torch.cat(has_mask).bool(), torch.cat(areas), dropped)


@torch.no_grad()
def evaluate(model: FVGPTModel, index: DatasetIndex, batch_size: int = 100, progress: bool = True,
             features: EvalFeatures | None = None) -> dict:
    """{"models": {row: {"base", "new", "hm", "base_fg", "d_fg"}}, "test_images": counts, "gates": the FRG's and
    BRG's statistics (with a plugin)}; a split without test images has accuracy None (printed as "-"), never NaN.
    base_fg is the base head's accuracy on the foreground views of the base test images with masks. `features`:
    eval_features() of this index on this model's backbone, when several models are scored on one pass."""
    feats = features if features is not None else eval_features(model, index, batch_size, progress)
    if feats.towers != model.towers():
        raise ValueError(f"features of towers {feats.towers} given to a model on {model.towers()}")
    f, f_fg, labels, has_mask, area, dropped = (feats.f, feats.f_fg, feats.labels, feats.has_mask, feats.area,
                                                feats.dropped)
    split = model.classes
    is_base = torch.tensor(split.base, device=f.device)[labels]
    target = torch.tensor(split.position, device=f.device)[labels]
    base_tables = model.tables(split.base_names)
    on_base = model.heads(f[is_base], base_tables)
    on_new = model.heads(f[~is_base], model.tables(split.new_names)) if split.new_ids else None
    masked = has_mask[is_base]
    on_base_fg = model.heads(f_fg[is_base][masked], base_tables)
    models = {}
    for name, (base_head, new_head) in model_rows(model).items():
        base_acc = accuracy(getattr(on_base, base_head), target[is_base])
        new_acc = accuracy(getattr(on_new, new_head), target[~is_base]) if on_new is not None else None
        row = {"base": base_acc, "new": new_acc,
               "hm": harmonic_mean(base_acc, new_acc) if base_acc is not None and new_acc is not None else None}
        if masked.any():
            z_full, z_fg = getattr(on_base, base_head)[masked], getattr(on_base_fg, base_head)
            row["base_fg"] = accuracy(z_fg, target[is_base][masked])
            row["d_fg"] = {f"tau{t}": float(foreground_shift(z_full, z_fg, t).mean()) for t in D_FG_TAUS}
        models[name] = row
    metrics = {"models": models, "test_images": {"base": int(is_base.sum()), "new": int((~is_base).sum()),
                                                 "base_with_mask": int(masked.sum()), "unreadable": int(dropped)}}
    if model.plugin is not None:
        metrics["gates"] = {"frg": _frg_statistics(model, on_base.z_full[masked], on_base_fg.z_full,
                                                   area[is_base][masked], target[is_base][masked])
                            if model.cfg.fdc else None,  # no base branch (ablation): no foreground teacher
                            "brg": {"base": _brg_statistics(on_base, target[is_base]),
                                    "new": _brg_statistics(on_new, target[~is_base]) if on_new is not None else None}}
    return metrics


def _mean_std(v: torch.Tensor) -> dict | None:
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False)), "n": len(v)} if len(v) else None


def _frg_statistics(model: FVGPTModel, z_full: torch.Tensor, z_fg: torch.Tensor, area: torch.Tensor,
                    target: torch.Tensor) -> dict:
    """The trust r the FRG gives the foreground view of each masked base test image, against the target it was
    trained toward, r* = 1[CE_fg + δ < CE_full] (E3): does the gate tell a helpful foreground view from another?
    Without the FRG (ablation) r is the 1 that training used."""
    r = torch.sigmoid(model.plugin.trust_logit(z_full, z_fg, area)) if model.cfg.frg else torch.ones_like(area)
    r_star = trust_target(z_full, z_fg, target, model.cfg.delta).bool()
    return {"r": _mean_std(r), "r_star_rate": float(r_star.float().mean()) if len(r) else None,
            "r_when_r_star_1": _mean_std(r[r_star]), "r_when_r_star_0": _mean_std(r[~r_star]),
            "agreement": float(((r > 0.5) == r_star).float().mean()) if len(r) else None}


def _brg_statistics(heads, target: torch.Tensor) -> dict:
    """The BRG's blend b on one split, overall and where only one of its inputs, the stage-1 model's new-class logits
    (z_full but for MMRL) and z_CLIP, is right: a gate that learned something leans toward CLIP (higher b) where
    CLIP is the one that is right."""
    full_right, clip_right = heads.z_new.argmax(-1) == target, heads.z_clip.argmax(-1) == target
    return {"b": _mean_std(heads.b), "b_when_only_clip_right": _mean_std(heads.b[clip_right & ~full_right]),
            "b_when_only_full_right": _mean_std(heads.b[full_right & ~clip_right])}


def _cell(v: float | None, width: int = 8, digits: int = 2) -> str:
    return f"{v:>{width}.{digits}f}" if v is not None else f"{'-':>{width}}"


def format_table(metrics: dict) -> str:
    lines = [f"{'model':<12}{'Base':>8}{'New':>8}{'HM':>8}{'D_fg τ=1':>11}{'D_fg τ=2':>11}"]
    for name, row in metrics["models"].items():
        d = row.get("d_fg", {})
        lines.append(f"{name:<12}{_cell(row['base'])}{_cell(row['new'])}{_cell(row['hm'])}"
                     f"{_cell(d.get('tau1'), 11, 4)}{_cell(d.get('tau2'), 11, 4)}")
    t = metrics.get("test_images")
    if t:
        lines.append(f"test images: {t['base']} base, {t['new']} new, {t['base_with_mask']} with masks"
                     + (f", {t['unreadable']} unreadable (skipped)" if t["unreadable"] else ""))
    return "\n".join(lines)
