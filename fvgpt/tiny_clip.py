"""A pretrained fvgpt-tiny for the embedded default: no CLIP weights can be downloaded here, and prompt tuning on a
randomly initialised CLIP has nothing to tune. This module pretrains the tiny model contrastively (open_clip's own
ClipLoss) on generated captioned images of every colour × shape, then saves an open_clip checkpoint (safetensors)
that `--pretrained <file>` loads like any local checkpoint.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbone import TINY_MODEL, load_backbone
from .demo_data import COLOURS, SHAPES, render
from .rundir import atomic_save_tensors

CAPTIONS = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture of the {}.")


def pretrain_tiny_clip(out: str | Path, steps: int = 400, batch: int = 64, lr: float = 2e-3, seed: int = 0,
                       progress: bool = True) -> Path:
    """Train fvgpt-tiny from random init on generated (image, caption) pairs; returns the checkpoint path."""
    from open_clip.loss import ClipLoss

    out = Path(out)
    backbone = load_backbone(TINY_MODEL, "none", init_seed=seed)
    model, pre = backbone.model, backbone.preprocess
    model.train().requires_grad_(True)
    labels = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = ClipLoss()
    transform = backbone.eval_transform
    bar = tqdm(range(steps), desc="pretrain fvgpt-tiny", disable=not progress)
    for _ in bar:
        chosen = [rng.choice(labels) for _ in range(batch)]
        images = torch.stack([transform(render(lab, rng, pre.size + 16)[0]) for lab in chosen])
        texts = backbone.tokenize([rng.choice(CAPTIONS).format(lab) for lab in chosen])
        img_f, txt_f, scale = model(images, texts)[:3]
        # captions repeat within a batch: ClipLoss treats them as negatives, which only slows learning a little
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # ≤ 100, as CLIP does
        bar.set_postfix(loss=f"{loss.item():.3f}")
    atomic_save_tensors(out, model.state_dict())
    return out
