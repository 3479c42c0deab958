"""`fvgpt eval --attention`: does the classifier look at the object? Foreground alignment of class-conditional maps
for zero-shot CLIP, the stage-1 prompt (CoOp/KgCoOp) and FVG-PT, on the base-class test images that have masks.

Per image, each row's map for the image's true class is read from the frozen tower's per-patch terms (fvgpt/explain.py)
along that row's text direction: zero-shot the CLIP row, the prompt its learned row, FVG-PT its base head's adapted
row G̃ (FDC's image adapter is nonlinear and left out). Two maps: `decomposition` (the last-layer decomposition that
bundles export and POST /explain serves) and `maskclip` (MaskCLIP's dense features, measured only). The tower is
frozen in all three, so a map differs between rows only through the text direction: a class-agnostic map (the
attention itself) could not differ at all.

Metrics per image (the map upsampled to the mask's pixels, nearest: each patch covers its pixels):
  fg_mass   Σ mask·M⁺ / Σ M⁺, with M⁺ = max(M, 0) (ReLU, not min-max: min-max inflates noisy signed maps); chance is
            the mask's area, reported beside it. An image whose map has no positive value is left out of the mean.
  hit       the pointing game: the patch where M is largest is mostly foreground (its mask fraction ≥ 0.5).
Differences (FVG-PT minus its prompt, the prompt minus zero-shot) are paired per image, with a percentile bootstrap
95 % CI over images.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from .data import DatasetIndex, FewShotDataset, collate, eval_geometry
from .errors import DataError
from .explain import ExplainTower, label_maps
from .heatmap import overlay
from .model import FVGPTModel
from .progress import track

MAPS = ("decomposition", "maskclip")
BOOTSTRAP = 2000
BOOTSTRAP_SEED = 0
HIT_FRACTION = 0.5


def patch_fractions(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, H, W) binary masks → (B, grid²) foreground fraction of each patch (row-major)."""
    return F.adaptive_avg_pool2d(mask.float().unsqueeze(1), grid).flatten(1)


def alignment(maps: torch.Tensor, fractions: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, P) maps and (B, P) patch foreground fractions → per image fg_mass (NaN where the map has no positive
    value) and hit (1.0 / 0.0). With equal-sized patches, Σ over pixels of mask·M⁺ is Σ over patches of fraction·M⁺
    times the patch's pixel count, so the patch form is the upsampled one exactly."""
    pos = maps.clamp(min=0)
    total = pos.sum(-1)
    fg_mass = torch.where(total > 0, (pos * fractions).sum(-1) / total.clamp(min=1e-30), torch.nan)
    top = maps.argmax(-1)
    hit = (fractions.gather(1, top[:, None])[:, 0] >= HIT_FRACTION).float()
    return {"fg_mass": fg_mass, "hit": hit}


def bootstrap_ci(diff: np.ndarray, n: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """Mean of paired per-image differences and its percentile bootstrap 95 % interval (NaNs dropped)."""
    d = diff[~np.isnan(diff)]
    if not len(d):
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def model_rows(model: FVGPTModel) -> dict[str, str]:
    """Row name → the text table it reads maps with (fvgpt.evaluate's rows, base heads)."""
    rows = {"zero-shot": "clip", model.cfg.method: "learned"}
    if model.plugin is not None:
        rows["fvgpt"] = "adapted"
    return rows


@torch.no_grad()
def evaluate_attention(model: FVGPTModel, index: DatasetIndex, batch_size: int = 32, progress: bool = True,
                       figure_images: int = 0) -> dict:
    """{"maps": {map: {row: {fg_mass, hit, n}}}, "differences": {map: {"<a> - <b>": {metric: [mean, lo, hi]}}},
    "chance": mean mask area, "images": n, "figure": [...]} over the masked base-class test images."""
    bb = model.backbone
    split = model.classes
    explain = ExplainTower(bb.model.visual, dense=True).eval()
    tables = model.tables(split.base_names)
    directions = {"clip": tables.clip, "learned": tables.learned}
    if model.plugin is not None:
        directions["adapted"] = model.plugin.adapt_text(tables.learned)
    rows = model_rows(model)
    base_position = {cid: i for i, cid in enumerate(split.base_ids)}
    tests = [s for s in index.test if s.label in base_position]
    dataset = FewShotDataset(tests, v2.Compose(eval_geometry(bb.preprocess)), image_transform=bb.eval_transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         num_workers=model.cfg.workers)
    per: dict[str, dict[str, dict[str, list]]] = {m: {r: {"fg_mass": [], "hit": []} for r in rows} for m in MAPS}
    areas: list[torch.Tensor] = []
    figure: list[dict] = []
    for batch in track(loader, "attention", progress, unit="batch"):
        batch.pop("dropped", None)
        if not batch:
            continue
        keep = batch["has_mask"].bool()
        if not keep.any():
            continue
        img, mask = batch["img"][keep].to(bb.device), batch["mask"][keep].to(bb.device)[:, 0] > 0.5
        target = torch.tensor([base_position[int(c)] for c in batch["label"][keep]], device=bb.device)
        _, contrib, dense = explain(img)
        fractions = patch_fractions(mask, explain.grid)
        areas.append(mask.float().mean((1, 2)))
        for m, tokens in (("decomposition", contrib), ("maskclip", dense)):
            for row, table in rows.items():
                scores = alignment(label_maps(tokens, directions[table][target]), fractions)
                for k, v in scores.items():
                    per[m][row][k].append(v.cpu())
        for i in range(len(img)):  # the figure: the first image of each class, up to figure_images
            if len(figure) < figure_images and int(target[i]) not in {f["class"] for f in figure}:
                figure.append({"class": int(target[i]), "pixels": img[i].cpu(), "maps": {
                    row: label_maps(contrib[i:i + 1], directions[table][target[i:i + 1]])[0].cpu()
                    for row, table in rows.items()}})
    if not areas:
        raise DataError(f"{index.root}: no base-class test image has a foreground mask; `fvgpt masks` writes them")
    values = {m: {r: {k: torch.cat(v).numpy() for k, v in d.items()} for r, d in rs.items()} for m, rs in per.items()}
    pairs = [(b, a) for a, b in [("zero-shot", model.cfg.method), (model.cfg.method, "fvgpt")] if b in rows]
    result: dict = {"images": int(sum(len(a) for a in areas)), "chance": float(torch.cat(areas).mean()),
                    "maps": {}, "differences": {}, "bootstrap": {"resamples": BOOTSTRAP, "seed": BOOTSTRAP_SEED}}
    for m in MAPS:
        result["maps"][m] = {r: {"fg_mass": float(np.nanmean(v["fg_mass"])), "hit": float(v["hit"].mean()),
                                 "n_fg_mass": int((~np.isnan(v["fg_mass"])).sum())} for r, v in values[m].items()}
        result["differences"][m] = {f"{a} - {b}": {k: list(bootstrap_ci(values[m][a][k] - values[m][b][k]))
                                                   for k in ("fg_mass", "hit")} for a, b in pairs}
    result["figure"] = figure
    return result


def format_attention(result: dict) -> str:
    lines = [f"foreground alignment on {result['images']} masked base-class test images "
             f"(chance fg_mass = mask area {result['chance']:.3f})",
             f"{'map':<15}{'model':<12}{'fg_mass':>9}{'hit':>7}"]
    for m, rows in result["maps"].items():
        for row, v in rows.items():
            lines.append(f"{m:<15}{row:<12}{v['fg_mass']:>9.3f}{v['hit']:>7.2f}")
    lines.append("paired differences, mean [95% bootstrap CI]:")
    for m, diffs in result["differences"].items():
        for pair, v in diffs.items():
            cells = "  ".join(f"{k} {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" for k, d in v.items())
            lines.append(f"{m:<15}{pair:<22}{cells}")
    return "\n".join(lines)


def draw_figure(result: dict, mean: tuple[float, ...], std: tuple[float, ...], path) -> None:
    """One row per image: the image, then each model row's decomposition map over it (PNG, PIL only)."""
    items = result["figure"]
    if not items:
        return
    rows = list(items[0]["maps"])
    tiles = []
    for item in items:
        x = item["pixels"].permute(1, 2, 0).numpy() * np.asarray(std) + np.asarray(mean)
        image = Image.fromarray((x.clip(0, 1) * 255).round().astype(np.uint8))
        g = int(round(len(item["maps"][rows[0]]) ** 0.5))
        tiles.append([image] + [overlay(image, item["maps"][r].numpy().reshape(g, g), (0, 0, 1, 1)) for r in rows])
    side = 160
    sheet = Image.new("RGB", (side * (len(rows) + 1), side * len(tiles) + 20), "white")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(["image", *rows]):
        draw.text((j * side + 4, 4), title, fill="black")
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            sheet.paste(tile.resize((side, side), Image.Resampling.NEAREST), (j * side, 20 + i * side))
    sheet.save(path)
