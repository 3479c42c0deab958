"""`fvgpt eval`: Base / New accuracy, HM and the foreground-shift index D_fg (E13) for zero-shot CLIP, the
prompt-tuned model and FVG-PT, from one pass over the test images (plus one over their foreground views).

Each model row reads its heads from the same forward (FVGPTModel.heads): Base accuracy is the row's base head over the
base classes on base test images, New accuracy its new head over the new classes on new test images (the paper's
split-selected evaluation). D_fg is the mean KL(p_full ‖ p_fg) of the base head on base test images with masks.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from .data import DataError, DatasetIndex, FewShotDataset, collate, eval_geometry, foreground_view
from .metrics import accuracy, foreground_shift, harmonic_mean
from .model import FVGPTModel
from .progress import track

D_FG_TAUS = (1, 2)


def model_rows(model: FVGPTModel) -> dict[str, tuple[str, str]]:
    """Model row → (base head, new head), as Heads attributes."""
    rows = {"zero-shot": ("z_clip", "z_clip"), model.cfg.method: ("z_full", "z_full")}
    if model.plugin is not None:
        rows["fvgpt"] = ("z_fdc", "z_pc")
    return rows


@torch.no_grad()
def _features(model: FVGPTModel, index: DatasetIndex, batch_size: int, progress: bool):
    bb = model.backbone
    dataset = FewShotDataset(index.test, v2.Compose(eval_geometry(bb.preprocess)), image_transform=bb.eval_transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         num_workers=model.cfg.workers)
    feats, fg_feats, labels, has_mask, dropped = [], [], [], [], 0
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
    if not feats:
        raise DataError(f"{index.root}: none of the {len(index.test)} test images could be read")
    return torch.cat(feats), torch.cat(fg_feats), torch.cat(labels), torch.cat(has_mask).bool(), dropped


@torch.no_grad()
def evaluate(model: FVGPTModel, index: DatasetIndex, batch_size: int = 100, progress: bool = True) -> dict:
    """{"models": {row: {"base", "new", "hm", "d_fg"}}, "test_images": counts}; a split without test images has
    accuracy None (printed as "-"), never NaN."""
    f, f_fg, labels, has_mask, dropped = _features(model, index, batch_size, progress)
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
            row["d_fg"] = {f"tau{t}": float(foreground_shift(z_full, z_fg, t).mean()) for t in D_FG_TAUS}
        models[name] = row
    return {"models": models, "test_images": {"base": int(is_base.sum()), "new": int((~is_base).sum()),
                                              "base_with_mask": int(masked.sum()), "unreadable": int(dropped)}}


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
