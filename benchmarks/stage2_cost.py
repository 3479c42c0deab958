"""Cost of one FVG-PT stage-2 epoch relative to one plain forward pass of the image tower over the same images.

Stage 2 runs the frozen tower on x and on x_fg (one pass over both) and reuses f(x) for zero-shot CLIP, so the
ratio should sit near 2×; the plugin's own forward/backward is tiny next to a ViT pass.

    python -m benchmarks.stage2_cost [--model ViT-B-16] [--shots 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ["red circle", "green square", "blue triangle", "yellow cross"]  # the first two are the base classes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="open_clip model (random weights: only time is measured)")
    p.add_argument("--shots", type=int, default=16, help="images per base class")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = p.parse_args(argv)

    import torch

    from fvgpt.backbone import load_backbone
    from fvgpt.classes import ClassSplit
    from fvgpt.config import TrainConfig
    from fvgpt.data import FewShotDataset, collate, load_index, train_transform
    from fvgpt.demo_data import make_demo_dataset
    from fvgpt.model import FVGPTModel
    from fvgpt.prompts import PromptLearner
    from fvgpt.rundir import atomic_write_json
    from fvgpt.train import train_plugin

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="fvgpt-stage2-"))
    data = make_demo_dataset(work / "data", per_class=args.shots + 2, classes=CLASSES, size=256)
    cfg = TrainConfig(data=str(data), model=args.model, pretrained="none", shots=args.shots, plugin_epochs=1,
                      test_fraction=0.1)
    backbone = load_backbone(cfg.model, cfg.pretrained)
    index = load_index(cfg.data, cfg.shots, cfg.seed, test_fraction=cfg.test_fraction)
    classes = ClassSplit.paper(index.classnames)
    model = FVGPTModel(backbone, classes, cfg, PromptLearner.initial(backbone, cfg.n_ctx))
    samples = [s for s in index.train if classes.base[s.label]]
    dataset = FewShotDataset(samples, train_transform(backbone.preprocess, augment=True))

    def plain_forward() -> None:  # same images, same loader and augmentation, no gradient
        for batch in torch.utils.data.DataLoader(dataset, batch_size=cfg.plugin_batch, collate_fn=collate):
            model.encode_image(batch["img"])

    plain_forward()  # warm-up
    t0 = time.perf_counter()
    plain_forward()
    forward_s = time.perf_counter() - t0
    run = work / "run"
    atomic_write_json(run / "progress.json", {})
    t0 = time.perf_counter()
    train_plugin(model, run, index, backbone.logit_scale, progress=False)
    epoch_s = time.perf_counter() - t0
    print(json.dumps({"model": args.model, "images": len(samples), "batch": cfg.plugin_batch,
                      "threads": args.threads, "plain_forward_s": round(forward_s, 3),
                      "stage2_epoch_s": round(epoch_s, 3), "ratio": round(epoch_s / forward_s, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
