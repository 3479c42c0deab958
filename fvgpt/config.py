"""The training configuration: one dataclass whose fields carry their default and help text once.

`fvgpt train`'s options are generated from these fields (fvgpt.cli), the resolved config is written to every run
dir with a schema version, and loading it refuses unknown keys and names missing ones, so a run never silently
picks up today's defaults. Torch-free. The method's defaults and where they come from: docs/method.md, "Defaults".
"""
from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from .datasets import NAMES, absolute, lookup
from .errors import FVGPTError
from .labels import MMRL_TEMPLATES, ZERO_SHOT_TEMPLATE

CONFIG_SCHEMA = 2  # run-dir config.json layout (docs/run-dir.md); 1 was the untyped config of fvgpt 0.1
METHODS = ("coop", "kgcoop", "promptsrc", "mmrl")
OPTIMIZERS = ("sgd", "adamw")
FG_FILLS = ("mean", "black")
PATH_FIELDS = ("data", "root", "split_file", "image_dir")  # stored absolute (and --pretrained when it is a file)
DATA_SOURCE = ("data", "dataset", "root", "split_file", "image_dir")  # where a run's images are read
KGCOOP_CTX_INIT = "a photo of a"
# Defaults that depend on the stage-1 method: each backbone's own config as FVG-PT re-ran it, for both stages (the
# FVGPT_<backbone> configs copy the backbone's). A field left None takes its method's value here; sources in
# docs/method.md, "Defaults". crop_scale 0.5 is MMRL's random-resized-crop scale (0.5, 1).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "coop": {"ctx_init": None, "prompt_augment": False, "prompt_lr": 0.0035, "prompt_batch": 4,
             "plugin_lr": 0.0035, "plugin_batch": 4, "optimizer": "sgd", "crop_scale": 0.08},
    "kgcoop": {"ctx_init": KGCOOP_CTX_INIT, "prompt_augment": True, "prompt_lr": 0.0035, "prompt_batch": 4,
               "plugin_lr": 0.0035, "plugin_batch": 4, "optimizer": "sgd", "crop_scale": 0.08},
    "promptsrc": {"ctx_init": KGCOOP_CTX_INIT, "prompt_augment": True, "prompt_lr": 0.0025, "prompt_batch": 32,
                  "plugin_lr": 0.0025, "plugin_batch": 32, "optimizer": "sgd", "crop_scale": 0.08},
    "mmrl": {"ctx_init": None, "prompt_augment": True, "prompt_lr": 0.001, "prompt_batch": 4, "plugin_lr": 0.001,
             "plugin_batch": 4, "optimizer": "adamw", "crop_scale": 0.5},
}
PER_METHOD = tuple(METHOD_DEFAULTS["coop"])


class ConfigError(FVGPTError):
    pass


def option(default: Any, help: str, group: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its CLI group and help text (the default is shown by the CLI, never repeated here)."""
    meta = {"help": help, "group": group} | ({"choices": choices} if choices else {})
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- data
    data: str = option("", "dataset folder: ImageFolder (ROOT/<class>/<image>, optional train/test folders) or a "
                           "CoOp/Dassl folder with split_zhou_*.json; masks in ROOT/mask/<same relative path>", "data")
    dataset: str | None = option(None, f"one of CoOp's datasets by name, read from --root as CoOp reads it: "
                                       f"{', '.join(NAMES)}", "data")
    root: str | None = option(None, "with --dataset: the folder that holds the dataset's folder (CoOp's --root "
                                    "DATA, or FVG-PT's, e.g. DATA/caltech-101); masks in ROOT/mask/<path>", "data")
    split_file: str | None = option(None, "Dassl split JSON (default: ROOT/split_zhou_*.json if present)", "data")
    image_dir: str | None = option(None, "folder the split file's paths are relative to (default: detected)", "data")
    test_fraction: float = option(0.3, "flat ImageFolder only: per-class held-out test part", "data")
    shots: int = option(16, "training images per class (K)", "data")
    seed: int = option(1, "selects the K-shot images (the same ones as CoOp's --seed) and seeds training", "data")
    base_classes: list[str] | None = option(None, "comma-separated base class names (default: the first half by "
                                                  "label, the paper's protocol)", "data")
    workers: int = option(0, "data loader worker processes", "data")
    # ---- backbone (frozen in both stages)
    model: str = option("ViT-B-16", "any open_clip model name, or fvgpt-tiny", "backbone")
    pretrained: str = option("openai", "open_clip tag (downloads once), a local checkpoint file, or none "
                                       "(random init)", "backbone")
    init_seed: int = option(0, "seed of the random init when --pretrained none", "backbone")
    device: str = option("cpu", "cpu or cuda", "backbone")
    # ---- stage 1: the learned prompt (CoOp / KgCoOp / PromptSRC) or representation (MMRL)
    method: str = option("coop", "prompt learner of stage 1", "prompt", METHODS)
    n_ctx: int = option(4, "learned context tokens (PromptSRC: of the text tower)", "prompt")
    ctx_init: str | None = option(None, f"words the context starts from (default: random for coop, "
                                        f"{KGCOOP_CTX_INIT!r} for kgcoop and promptsrc)", "prompt")
    kg_weight: float = option(2.0, "KgCoOp: weight of the knowledge-guided regulariser (λ)", "prompt")
    prompt_epochs: int = option(10, "stage-1 epochs", "prompt")
    prompt_lr: float | None = option(None, "stage-1 learning rate (default: 0.0035 coop/kgcoop, 0.0025 promptsrc, "
                                           "0.001 mmrl)", "prompt")
    prompt_batch: int | None = option(None, "stage-1 batch size (default: 4; 32 for promptsrc)", "prompt")
    prompt_augment: bool | None = option(None, "stage-1 random resized crop + flip (default: off for coop, as "
                                                "CoOp's B2N config; on for the others)", "prompt")
    crop_scale: float | None = option(None, "smallest area fraction kept by random resized crops, both stages "
                                            "(default: 0.08; 0.5 for mmrl)", "prompt")
    optimizer: str | None = option(None, "optimiser of both stages (default: sgd; adamw for mmrl)", "prompt",
                                   OPTIMIZERS)
    # PromptSRC (Khattak et al. 2023): deep prompts in both towers, self-regulation, Gaussian prompt aggregation
    n_ctx_vision: int = option(4, "PromptSRC: learned visual prompt tokens", "promptsrc")
    prompt_depth: int | None = option(None, "PromptSRC: layers that get prompts, in each tower (default: 9, or the "
                                            "tower's layers if fewer)", "promptsrc")
    text_loss_weight: float = option(25.0, "PromptSRC: weight of the L1 text self-regulation", "promptsrc")
    image_loss_weight: float = option(10.0, "PromptSRC: weight of the L1 image self-regulation", "promptsrc")
    gpa_mean: float = option(15.0, "PromptSRC: mean (in epochs) of the Gaussian prompt aggregation", "promptsrc")
    gpa_std: float = option(1.0, "PromptSRC: standard deviation (in epochs) of the Gaussian prompt aggregation",
                            "promptsrc")
    # MMRL (Guo et al. 2025): a shared representation space projected into the upper layers of both towers
    rep_tokens: int = option(5, "MMRL: representation tokens", "mmrl")
    rep_dim: int = option(512, "MMRL: width of the shared representation space", "mmrl")
    rep_layer: int | None = option(None, "MMRL: first layer (1-based) that gets representation tokens, in each "
                                         "tower (default: 6 of 12, i.e. ⌈layers/2⌉)", "mmrl")
    mmrl_alpha: float = option(0.7, "MMRL: weight α of the class-token logits (1 − α: representation logits)",
                               "mmrl")
    reg_weight: float = option(1.0, "MMRL: weight λ of the cosine regularisers toward CLIP without prompts", "mmrl")
    mmrl_scale: float = option(100.0, "MMRL: logit scale of its logits (its code's constant 100)", "mmrl")
    mmrl_template: str | None = option(None, "MMRL: the text prompt written by hand (default: its template per "
                                             "dataset, \"a photo of a {}.\" for other data)", "mmrl")
    # ---- stage 2: the FVG-PT plugin
    plugin_epochs: int = option(10, "stage-2 epochs", "plugin")
    plugin_lr: float | None = option(None, "stage-2 learning rate (default: the method's stage-1 value)", "plugin")
    plugin_batch: int | None = option(None, "stage-2 batch size (default: the method's stage-1 value)", "plugin")
    bottleneck: int = option(64, "FDC adapter bottleneck width h (E5)", "plugin")
    gate_hidden: int = option(32, "hidden width g of the FRG and BRG MLPs (E2, E10)", "plugin")
    fdc_init_scale: float = option(1e-3, "std of the adapters' last layer at init (adapters start near identity)",
                                   "plugin")
    fdc_logit_scale: float | None = option(None, "S in E6 (default: the stage-1 model's logit scale: the backbone's "
                                                 "own, 100 for CLIP; --mmrl-scale for mmrl)", "plugin")
    fg_fill: str = option("mean", "background of the foreground view: CLIP mean colour or pixel black", "plugin",
                          FG_FILLS)
    tau: float = option(2.0, "temperature τ of every softmax in the gates and KL terms (τ_d = τ_PC = τ_KL)", "plugin")
    lambda_d: float = option(10.0, "weight λ_d of the foreground distillation L_dist (E8)", "plugin")
    lambda_rg: float = option(1.0, "weight λ_RG of the FRG's BCE L_FRG (E8)", "plugin")
    lambda_new: float = option(1.0, "weight λ_new of the Prior Calibration loss L_PC (E14)", "plugin")
    fdc: bool = option(True, "the base branch: Foreground Distillation Compensation with its gate; off (ablation, "
                             "the paper's \"PC only\"): no adapters and no FRG, the base head is z_full and only "
                             "Prior Calibration trains", "plugin")
    frg: bool = option(True, "the Foreground Reliability Gate; --no-frg (ablation) trusts every usable "
                             "foreground view (r ≡ 1 in E7) and drops L_FRG", "plugin")
    prior_calibration: bool = option(True, "the new branch: Prior Calibration; off (ablation, the paper's rows "
                                           "without PC): new classes go through the FDC adapters too (b ≡ 0) and "
                                           "L_PC is dropped", "plugin")
    pc_kl: bool = option(True, "add KL(p_CLIP ‖ p_PC) to L_PC (E12)", "plugin")
    delta: float = option(0.0, "margin δ in the trust target r* = 1[CE_fg + δ < CE_full] (E3)", "plugin")
    area_min: float = option(0.02, "foreground area below which a mask is unusable (r := 0)", "plugin")
    area_max: float = option(0.98, "foreground area above which a mask is unusable (r := 0)", "plugin")
    # ---- optimiser and schedule, both stages (Dassl's defaults)
    momentum: float = option(0.9, "SGD momentum", "optimiser")
    weight_decay: float = option(5e-4, "weight decay (SGD: L2; AdamW: decoupled)", "optimiser")
    warmup_epochs: int = option(1, "epochs at the constant warm-up learning rate", "optimiser")
    warmup_lr: float = option(1e-5, "warm-up learning rate", "optimiser")
    eval_batch: int = option(100, "batch size of evaluation", "optimiser")

    def __post_init__(self) -> None:
        # paths and names resolve here, so the stored config says what actually ran, from any directory
        for name in PATH_FIELDS:
            if getattr(self, name):
                setattr(self, name, str(absolute(getattr(self, name))))
        self.pretrained = weights_source(self.pretrained)
        if self.dataset and (spec := lookup(self.dataset)):
            self.dataset = spec.name
        for name, value in METHOD_DEFAULTS.get(self.method, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.method == "mmrl" and self.mmrl_template is None:
            self.mmrl_template = mmrl_template(self.dataset)
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:  # before anything else: the per-method defaults are unresolved
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        problems = []
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{f.name} must be one of {', '.join(choices)}, not {getattr(self, f.name)!r}")
        for name in ("shots", "n_ctx", "prompt_epochs", "plugin_epochs", "prompt_batch", "plugin_batch",
                     "bottleneck", "gate_hidden", "eval_batch", "n_ctx_vision", "rep_tokens", "rep_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("prompt_depth", "rep_layer"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("prompt_lr", "plugin_lr", "tau", "fdc_init_scale", "gpa_std", "mmrl_scale"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, not {getattr(self, name)}")
        if not 0 < self.crop_scale <= 1:
            problems.append(f"crop_scale must be in (0, 1], not {self.crop_scale}")
        if not 0 <= self.mmrl_alpha <= 1:
            problems.append(f"mmrl_alpha must be in [0, 1], not {self.mmrl_alpha}")
        if self.method == "mmrl" and self.mmrl_template.count("{}") != 1:
            problems.append(f"mmrl_template must hold one {{}} for the class name, not {self.mmrl_template!r}")
        if not (self.fdc or self.prior_calibration):
            problems.append("--no-fdc and --no-prior-calibration leave the plugin nothing to train: that is the "
                            "stage-1 model (train --stage prompt)")
        if not 0 <= self.area_min < self.area_max <= 1:
            problems.append(f"need 0 ≤ area_min < area_max ≤ 1, got {self.area_min}, {self.area_max}")
        if not 0 <= self.test_fraction < 1:
            problems.append(f"test_fraction must be in [0, 1), not {self.test_fraction}")
        if self.seed < 0:
            problems.append(f"seed must be at least 0, not {self.seed} (CoOp leaves negative seeds unseeded)")
        problems += self._data_source_problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def _data_source_problems(self) -> list[str]:
        if self.dataset is None:
            if self.root:
                return ["--root goes with --dataset NAME; a single dataset folder is --data FOLDER"]
            return [] if self.data else ["no dataset given: --data FOLDER, or --dataset NAME --root ROOT"]
        problems = [] if self.dataset in NAMES else [f"unknown dataset {self.dataset!r}; --dataset takes one of "
                                                     f"{', '.join(NAMES)}"]
        if not self.root:
            problems.append(f"--dataset {self.dataset} needs --root: the folder that holds its folder (CoOp's DATA)")
        if self.data:
            problems.append("give --data FOLDER or --dataset NAME --root ROOT, not both")
        if self.split_file or self.image_dir:
            problems.append("--split-file and --image-dir go with --data; a --dataset knows its files")
        return problems

    def to_dict(self) -> dict:
        return asdict(self)

    def with_method(self, method: str, keep: tuple[str, ...] = ()) -> TrainConfig:
        """This config for another stage-1 method, its per-method defaults taken afresh (except the fields in
        `keep`, which were chosen for the task rather than taken from a method)."""
        reset = {name: None for name in (*PER_METHOD, "mmrl_template") if name not in keep}
        return replace(self, method=method, **reset)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Strict: every field must be present and no other key (a run is what it was, never today's defaults)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        missing = [n for n in names if n not in d]
        if unknown or missing:
            raise ConfigError("config does not match this version of fvgpt:"
                              + (f" unknown keys {unknown}" if unknown else "")
                              + (f" missing keys {missing}" if missing else ""))
        return cls(**d)


def mmrl_template(dataset: str | None) -> str:
    """MMRL's hand-written prompt for a CoOp dataset (its CUSTOM_TEMPLATES, trainers/mmrl.py: one for each of CoOp's
    11); ImageNet's "a photo of a {}." for any other data."""
    spec = lookup(dataset) if dataset else None
    return MMRL_TEMPLATES[spec.title] if spec else ZERO_SHOT_TEMPLATE


def weights_source(pretrained: str) -> str:
    """--pretrained as stored: a checkpoint file by its absolute path (a run or bundle works from any directory); an
    open_clip tag or "none" as given."""
    return str(absolute(pretrained)) if pretrained.lower() != "none" and absolute(pretrained).is_file() else pretrained


def config_fields() -> list:
    """The fields in declaration order, for the CLI generator."""
    return list(fields(TrainConfig))


def field_default(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def config_json(cfg: TrainConfig, backbone: dict) -> str:
    return json.dumps({"schema_version": CONFIG_SCHEMA, "train": cfg.to_dict(), "backbone": backbone}, indent=2)
