"""The resolved training configuration, written to every run dir (defaults: method.md §7.1 and §10)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

METHODS = ("coop", "kgcoop")
STAGES = ("backbone", "plugin", "all")


@dataclass
class TrainConfig:
    # data
    data: str = ""
    split_file: str | None = None
    image_dir: str | None = None
    test_fraction: float = 0.3  # flat ImageFolder only: per-class held-out test part
    shots: int = 16
    seed: int = 1
    base_classes: list[str] | None = None  # None: first ⌈n/2⌉ classes by label
    workers: int = 0
    # backbone
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    init_seed: int = 0  # random-init weights (pretrained = none) are reproducible from this seed
    device: str = "cpu"
    # stage 1: CoOp / KgCoOp
    method: str = "coop"
    n_ctx: int = 4
    ctx_init: str | None = None  # KgCoOp: "a photo of a"
    kg_weight: float = 2.0
    backbone_epochs: int = 10
    backbone_lr: float = 0.0035
    backbone_batch: int = 4
    backbone_augment: bool = False  # CoOp backbone config: centre crop only; KgCoOp: random resized crop + flip
    crop_scale: float = 0.08  # smallest area fraction of RandomResizedCrop (Dassl default; MMRL uses 0.5)
    # stage 2: the FVG-PT plugin
    plugin_epochs: int = 10
    plugin_lr: float = 0.0035
    plugin_batch: int = 4
    bottleneck: int = 64
    gate_hidden: int = 32
    fdc_init_scale: float = 1e-3
    fdc_logit_scale: float | None = None  # None: the backbone's own scale (100 for pretrained CLIP)
    fg_fill: str = "mean"  # background of x_fg: CLIP mean colour ("mean") or pixel black ("black")
    lambda_d: float = 10.0
    lambda_rg: float = 1.0
    lambda_new: float = 1.0
    pc_kl: bool = True
    # optimiser shared by both stages (Dassl defaults)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    eval_batch: int = 100

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.shots < 1:
            raise ValueError("shots must be >= 1")
        if self.fg_fill not in ("mean", "black"):
            raise ValueError("fg_fill must be 'mean' or 'black'")

    @classmethod
    def for_method(cls, method: str, **overrides) -> "TrainConfig":
        """Method defaults: KgCoOp initialises the context from "a photo of a" and augments in both stages."""
        base = {"method": method}
        if method == "kgcoop":
            base |= {"ctx_init": "a photo of a", "backbone_augment": True}
        return cls(**(base | {k: v for k, v in overrides.items() if v is not None}))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
