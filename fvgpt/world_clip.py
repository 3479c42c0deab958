"""The micro-CLIP of the generated world: `fvgpt-micro` (fvgpt/model_configs/fvgpt-micro.json) pretrained
contrastively with open_clip's ClipLoss on (image, caption) pairs drawn from fvgpt.world, from random init.

No CLIP weights can be downloaded on the build machines, and prompt tuning needs a pretrained model whose text tower
knows the words of the task; this one knows the world's objects and scenes. The committed checkpoint
(fvgpt/weights/, README there) is what `fvgpt world pretrain` writes with its defaults; it loads through the ordinary
local-file path, `--model fvgpt-micro --pretrained PATH`.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .backbone import Backbone, load_backbone
from .errors import FVGPTError
from .labels import ZERO_SHOT_TEMPLATE
from .rundir import atomic_save_tensors
from .world import ALL_KINDS, BACKDROP, SCENE_WORDS, SCENES, PretrainConfig, render, sample_pair, seeded_rng

CHECKPOINT = Path(__file__).resolve().parent / "weights" / "fvgpt-micro-world.safetensors"
CHECKPOINT_SHA256 = "04a8d608aef1c47995d6df50cf45a6cf3ee735b55b6042732222c4e26801dc9f"  # fvgpt/weights/README.md


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CheckpointError(FVGPTError):
    pass


def verified_checkpoint() -> Path:
    """The committed checkpoint, refused unless its sha256 is the recorded one."""
    if not CHECKPOINT.is_file():
        raise CheckpointError(f"the committed micro-CLIP {CHECKPOINT} is missing; restore it from git or make it "
                              f"with `fvgpt world pretrain --out {CHECKPOINT}`")
    if (digest := file_sha256(CHECKPOINT)) != CHECKPOINT_SHA256:
        raise CheckpointError(f"{CHECKPOINT} has sha256 {digest}, not the recorded {CHECKPOINT_SHA256}; restore it "
                              f"from git (a re-pretrained one is loaded with --pretrained PATH instead)")
    return CHECKPOINT


def _batch(backbone: Backbone, cfg: PretrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of hard negatives: its images share `batch_scenes` scenes (drawn per batch). Scenes are learned within
    a few hundred steps, after which only pairs on the same scene, which differ in the object, teach anything; with
    every scene in every batch the objects' colours and patterns were learned several times more slowly."""
    rng = seeded_rng(cfg.seed, 10, step)
    everywhere = SCENES + (BACKDROP,)
    scenes = tuple(everywhere[i] for i in rng.choice(len(everywhere), cfg.batch_scenes, replace=False))
    pairs = [sample_pair(rng, backbone.preprocess.size, (cfg.seed, 11, step, j), scenes) for j in range(cfg.batch)]
    pixels = np.stack([p[0] for p in pairs]).astype(np.float32) / 255.0
    mean, std = (np.array(v, np.float32).reshape(1, 1, 1, 3) for v in (backbone.preprocess.mean,
                                                                       backbone.preprocess.std))
    images = torch.from_numpy(((pixels - mean) / std).transpose(0, 3, 1, 2).copy())
    return images, backbone.tokenize([p[1] for p in pairs])


def pretrain_world_clip(out: str | Path, cfg: PretrainConfig = PretrainConfig(), progress: bool = True) -> dict:
    """Train cfg.model from random init on world pairs; write an open_clip state dict (safetensors) to `out`.
    Returns a record: the config, the time, images/s, the last losses and the zero-shot probe (`probe`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(Path(out), cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(out: Path, cfg: PretrainConfig, progress: bool) -> dict:
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    from .progress import on_terminal

    backbone = load_backbone(cfg.model, "none", init_seed=cfg.seed)
    model = backbone.model.train().requires_grad_(True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest,
                                                                                   "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, round(cfg.warmup * cfg.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

    loss_fn = ClipLoss()
    losses: list[float] = []
    probes: dict[int, dict] = {}
    t0, cpu0, load = time.perf_counter(), time.process_time(), os.getloadavg()
    bar_shown = progress and on_terminal()  # a log gets a plain line every 50 steps instead
    bar = tqdm(range(cfg.steps), desc=f"pretrain {cfg.model}", disable=not bar_shown)
    for step in bar:
        images, texts = _batch(backbone, cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        img_f, txt_f, scale = model(images, texts)[:3]
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP: the scale never exceeds 100
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if not bar_shown and (step + 1) % 50 == 0:
            print(f"pretrain step {step + 1}/{cfg.steps}: loss {np.mean(losses[-50:]):.3f}", flush=True)
        if cfg.probe_every and (step + 1) % cfg.probe_every == 0 and step + 1 < cfg.steps:
            probes[step + 1] = probe(backbone, images=200)
            tqdm.write(f"step {step + 1}: zero-shot probe {probes[step + 1]}")
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0  # probes included (a small part)
    model.eval().requires_grad_(False)
    atomic_save_tensors(out, model.state_dict())
    # one thread's CPU time is what the run takes on an idle core, whatever else the machine was doing
    return {"config": asdict(cfg), "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
            "images_per_s": round(cfg.steps * cfg.batch / seconds, 1),
            "images_per_cpu_s": round(cfg.steps * cfg.batch / cpu_seconds, 1),
            "load_average": {"start": load, "end": os.getloadavg()},
            "loss_first": round(float(np.mean(losses[:20])), 4), "loss_last": round(float(np.mean(losses[-20:])), 4),
            "probe": probe(backbone), "probes_along_the_way": probes, "sha256": file_sha256(out)}


@torch.no_grad()
def probe(backbone: Backbone, images: int = 400, seed: int = 12345) -> dict:
    """Zero-shot accuracy (%) on fresh world images (random kind on a random scene): the object among all
    shape × colour × pattern kinds, each attribute read off that prediction, and the scene among the scenes."""
    kinds = list(ALL_KINDS)
    rng = seeded_rng(seed)
    drawn = [(kinds[rng.integers(len(kinds))], SCENES[rng.integers(len(SCENES))]) for _ in range(images)]
    pre = backbone.preprocess
    pixels = np.stack([render(k, s, pre.size, (seed, i))[0] for i, (k, s) in enumerate(drawn)]).astype(np.float32)
    mean, std = (np.array(v, np.float32).reshape(1, 1, 1, 3) for v in (pre.mean, pre.std))
    x = torch.from_numpy(((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy()).to(backbone.device)
    f = torch.nn.functional.normalize(backbone.model.encode_image(x), dim=-1)

    def text(prompts: list[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(backbone.model.encode_text(backbone.tokenize(prompts)), dim=-1)

    obj = (f @ text([ZERO_SHOT_TEMPLATE.format(k.name) for k in kinds]).t()).argmax(-1).tolist()
    scene_prompts = [f"a photo of {SCENE_WORDS[s][0]}." for s in SCENES]
    scene = (f @ text(scene_prompts).t()).argmax(-1).tolist()
    result = {"object": 0.0, "shape": 0.0, "colour": 0.0, "pattern": 0.0, "scene": 0.0}
    for (kind, s), o, sc in zip(drawn, obj, scene):
        guess = kinds[o]
        result["object"] += guess == kind
        result["shape"] += guess.shape == kind.shape
        result["colour"] += guess.colour == kind.colour
        result["pattern"] += guess.pattern == kind.pattern
        result["scene"] += SCENES[sc] == s
    return {k: round(100 * v / images, 1) for k, v in result.items()}
