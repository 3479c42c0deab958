"""`fvgpt eval`: Base / New accuracy, HM and the foreground-shift index D_fg (E13) for zero-shot CLIP, the tuned
backbone and FVG-PT, from one pass over the test images (plus one over the masked foreground views)."""
from __future__ import annotations

import torch
from torchvision.transforms import v2
from tqdm.auto import tqdm

from .classifier import text_tables
from .data import DatasetIndex, FewShotDataset, collate, eval_geometry, foreground_view
from .losses import foreground_shift, harmonic_mean
from .rundir import Run


@torch.no_grad()
def _features(run: Run, index: DatasetIndex, batch_size: int, progress: bool):
    bb = run.backbone
    dataset = FewShotDataset(index.test, v2.Compose(eval_geometry(bb.preprocess)), image_transform=bb.eval_transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         num_workers=run.config.workers)
    feats, fg_feats, labels, has_mask, dropped = [], [], [], [], 0
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        dropped += batch.pop("dropped")
        if not batch:
            continue
        img = batch["img"].to(bb.device)
        feats.append(bb.encode_images(img))
        x_fg = foreground_view(img, batch["mask"].to(bb.device), bb.preprocess, run.config.fg_fill)
        fg_feats.append(bb.encode_images(x_fg))
        labels.append(batch["label"].to(bb.device))
        has_mask.append(batch["has_mask"].to(bb.device))
    if not feats:
        raise RuntimeError("no test image could be read")
    return torch.cat(feats), torch.cat(fg_feats), torch.cat(labels), torch.cat(has_mask).bool(), dropped


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean() * 100) if len(labels) else float("nan")


@torch.no_grad()
def evaluate(run: Run, index: DatasetIndex, batch_size: int = 100, progress: bool = True) -> dict:
    """Metrics per model ("zero-shot", the stage-1 method, "fvgpt" when the plugin exists).

    Base accuracy uses each model's base branch over the base classes, New accuracy its new branch over the new
    classes (the paper's split-selected evaluation). D_fg is the mean KL(p_full ‖ p_fg) of the base branch on base
    test images that have masks, at τ = 1 and τ = 2 (method.md §10 #18).
    """
    bb = run.backbone
    f, f_fg, labels, has_mask, dropped = _features(run, index, batch_size, progress)
    tables = text_tables(bb, run.classnames, run.ctx)
    flags = torch.tensor(run.base_flags, device=f.device)
    base_cls = flags.nonzero().squeeze(1)
    new_cls = (~flags).nonzero().squeeze(1)
    is_base = flags[labels]
    remap = torch.full((len(flags),), -1, dtype=torch.long, device=f.device)
    remap[base_cls] = torch.arange(len(base_cls), device=f.device)
    remap[new_cls] = torch.arange(len(new_cls), device=f.device)
    y_base, y_new = remap[labels[is_base]], remap[labels[~is_base]]
    fb, fn, fgb = f[is_base], f[~is_base], f_fg[is_base & has_mask]
    s = bb.logit_scale

    def zs(x, cls):
        return s * x @ tables.clip[cls].t()

    def tuned(x, cls):
        return s * x @ tables.tuned[cls].t()

    branches = {"zero-shot": (lambda x: zs(x, base_cls), lambda x: zs(x, new_cls)),
                run.config.method: (lambda x: tuned(x, base_cls), lambda x: tuned(x, new_cls))}
    if run.plugin is not None:
        adapted = run.plugin.adapt_text(tables.tuned[base_cls])
        branches["fvgpt"] = (lambda x: run.plugin.base_logits(x, adapted),
                             lambda x: run.plugin.calibrate(tuned(x, new_cls), zs(x, new_cls))[0])
    models = {}
    for name, (base_head, new_head) in branches.items():
        base_acc = _accuracy(base_head(fb), y_base)
        new_acc = _accuracy(new_head(fn), y_new) if len(new_cls) else float("nan")
        row = {"base": base_acc, "new": new_acc, "hm": harmonic_mean(base_acc, new_acc) if len(new_cls) else None}
        if len(fgb):
            z_full, z_fg = base_head(fb[has_mask[is_base]]), base_head(fgb)
            row["d_fg"] = {f"tau{t}": float(foreground_shift(z_full, z_fg, t).mean()) for t in (1, 2)}
        models[name] = row
    return {"models": models, "test_images": {"base": int(is_base.sum()), "new": int((~is_base).sum()),
                                              "base_with_mask": int(len(fgb)), "unreadable": int(dropped)}}


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
