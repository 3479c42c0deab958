"""PromptSRC and MMRL as FVG-PT's stage-1 learners (shared/research/backbones.md; docs/method.md "Stage 1"), through
the real entry points (FVGPTModel, fvgpt.train.train_prompt / train_plugin, fvgpt.evaluate) on the tiny model.

Every expectation comes from tests/method_reference.py: the learners' towers recomputed by open_clip's own forward with
the prompts or representation tokens put in by hooks, their objectives and the plugin's from plain formulas, SGD and
AdamW written out. Checked: where the prompts go and which tower passes run (the per-image pass counts of the spec:
PromptSRC 2 passes of the whole tower for CLIP + its own, MMRL the trunk once and both branches), every stage-1 and
stage-2 loss term and gradient, the training stage across an interruption (optimiser state, PromptSRC's Gaussian
prompt aggregate), and evaluation's rows (MMRL: base on the fused logits, new on the class-token logits).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import pytest
import torch

import method_reference as ref
from fvgpt.backbone import load_backbone
from fvgpt.config import TrainConfig
from fvgpt.evaluate import eval_features, evaluate, model_rows
from fvgpt.model import FVGPTModel
from fvgpt.promptsrc import TEACHER_TEMPLATES
from fvgpt.rundir import RunDirError, read_learner, read_tensors
from fvgpt.train import train_plugin, train_prompt
from test_method_wiring import base_split, perturb, read_image

S_FDC = 37.0
METHODS = {"promptsrc": {}, "mmrl": {"rep_dim": 16}, "mmrl_trunk": {"rep_dim": 16, "rep_layer": 2}}


def config(name: str, **overrides) -> TrainConfig:
    method = "mmrl" if name.startswith("mmrl") else name
    return TrainConfig(data="unused", model="fvgpt-tiny", pretrained="none", method=method,
                       **(METHODS[name] | overrides))


def learner_model(backbone, classes, name: str, seed: int = 3, **overrides) -> FVGPTModel:
    """A model with the learner at its start moved by noise, so that no prompt or token is at a trivial value."""
    torch.manual_seed(seed)
    model = FVGPTModel.new_prompt(backbone, classes, config(name, **overrides))
    perturb(model.prompt, seed + 1, 0.3)
    return model


def images(backbone, index, classes) -> tuple[list, torch.Tensor, torch.Tensor]:
    samples = [s for s in index.train if classes.base[s.label]]
    pixels, masks = map(torch.stack, zip(*(read_image(backbone, s) for s in samples)))
    return samples, pixels, masks


def tokens(weights: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """MMRL's R_k = F_k(R) for every layer k, from the learner's weights (the reference's own arithmetic)."""
    count = len({k.split(".")[1] for k in weights if k.startswith(prefix + ".")})
    return torch.stack([weights["rep"] @ weights[f"{prefix}.{k}.weight"].t() + weights[f"{prefix}.{k}.bias"]
                        for k in range(count)])


def reference_features(backbone, name: str, weights: dict, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The learner's image features per kind, through open_clip's forward: PromptSRC [f_p]; MMRL [f_c, f_r]."""
    if name == "promptsrc":
        return [ref.promptsrc_image(backbone.model, pixels, weights["vision_ctx"], weights["vision_deep"])]
    return list(ref.mmrl_image(backbone.model, pixels, tokens(weights, "to_visual"), weights["proj_rep"]))


def reference_text(backbone, name: str, weights: dict, labels: list[str],
                   template: str = "a photo of a {}.") -> torch.Tensor:
    """The learner's text features through open_clip; MMRL's prompt is its template."""
    if name == "promptsrc":
        return ref.promptsrc_text(backbone.model, backbone.tokenizer, ref.learned_texts(labels, 4), weights["ctx"],
                                  weights["text_deep"])
    return ref.mmrl_text(backbone.model, backbone.tokenizer, [template.format(ref.words(c)) for c in labels],
                         tokens(weights, "to_text"))


class BlockCalls:
    """Counts, per visual block of the tiny model, the images that went through it."""

    def __init__(self, backbone):
        self.blocks = list(backbone.model.visual.transformer.resblocks)
        self.images = [0] * len(self.blocks)
        self.handles = [b.register_forward_hook(lambda _m, args, _o, i=i: self.add(i, args[0])) for i, b in
                        enumerate(self.blocks)]

    def add(self, i: int, x: torch.Tensor) -> None:
        self.images[i] += x.shape[0]

    def passes(self, n_images: int) -> float:
        """Tower passes per image: block executions / (blocks × images)."""
        return sum(self.images) / (len(self.blocks) * n_images)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


# ---- the towers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_towers_text_and_pass_counts(backbone, index, name):
    """The model object's image features are [f_CLIP, the learner's] (PromptSRC: its prompted tower; MMRL: f_c, f_r),
    each equal to open_clip's forward with the prompts put in by hooks; its learned text features likewise; CLIP's own
    text for the zero-shot rows. The passes per image, counted on the blocks: PromptSRC runs the whole tower twice
    (CLIP's, its own), MMRL the trunk once and the blocks after it twice; the learner alone (the foreground view) one
    pass."""
    classes = base_split(index.classnames)
    model = learner_model(backbone, classes, name)
    weights = {k: v.detach() for k, v in model.prompt.state_dict().items()}
    _, pixels, _ = images(backbone, index, classes)
    calls = BlockCalls(backbone)
    try:
        f = model.encode_image(pixels)
        both = list(calls.images)
        calls.images = [0] * len(calls.blocks)
        tuned = model.encode_tuned(pixels)
    finally:
        calls.close()
    want = reference_features(backbone, name, weights, pixels)
    assert f.shape == (6, 1 + len(want), 64) and tuned.shape == (6, len(want), 64)
    assert torch.allclose(f[:, 0], ref.image_features(backbone.model, pixels), atol=1e-6)
    for k, w in enumerate(want):
        assert torch.allclose(f[:, 1 + k], w, atol=1e-5) and torch.allclose(tuned[:, k], w, atol=1e-5)
        assert (f[:, 1 + k] - f[:, 0]).abs().max() > 1e-3  # the learner's tower is not CLIP's
    n = len(calls.blocks)
    trunk = 0 if name == "promptsrc" else n - len(model.prompt.to_visual)
    assert trunk == {"promptsrc": 0, "mmrl": 0, "mmrl_trunk": 1}[name]
    assert both == [6] * trunk + [12] * (n - trunk) and calls.images == [6] * n
    text = model.tables(["red circle", "blue_triangle"])
    assert torch.allclose(text.learned, reference_text(backbone, name, weights, ["red circle", "blue_triangle"]),
                          atol=1e-5)
    assert torch.allclose(text.clip, ref.text_features(backbone.model, backbone.tokenizer,
                                                       ref.zero_shot_texts(["red circle", "blue_triangle"])), atol=1e-6)


def test_learners_start_as_their_papers_say(backbone):
    """PromptSRC: the text context = the embeddings of "a photo of a", every other prompt N(0, 0.02²), prompts in
    min(9, layers) layers of each tower (the tiny model's 2: input + 1 deep set). MMRL: R ~ N(0, 0.02²), one Linear
    per layer from ⌈layers/2⌉ on, all equal at the start (MMRL's clones), P_r ~ width^-0.5·N(0, 1)."""
    torch.manual_seed(0)
    src = FVGPTModel.new_prompt(backbone, base_split(["a", "b", "c", "d", "e"]),
                                TrainConfig(data="u", method="promptsrc", n_ctx_vision=300)).prompt
    ids = backbone.tokenizer(["a photo of a"])[0, 1:5]
    assert torch.equal(src.ctx, backbone.model.token_embedding.weight[ids])
    assert src.text_deep.shape == (1, 4, 64) and src.vision_ctx.shape == (300, 64)
    assert src.vision_deep.shape == (1, 300, 64)
    assert 0.018 < src.vision_ctx.std() < 0.022 and 0.015 < src.text_deep.std() < 0.025
    assert all(p.requires_grad for p in src.parameters())
    micro = load_backbone("fvgpt-micro", "none")
    deep = FVGPTModel.new_prompt(micro, base_split(["a", "b", "c", "d", "e"]),
                                 TrainConfig(data="u", method="promptsrc", prompt_depth=3)).prompt
    assert deep.vision_deep.shape == (2, 4, 128) and deep.text_deep.shape == (2, 4, 64)
    mm = FVGPTModel.new_prompt(micro, base_split(["a", "b", "c", "d", "e"]),
                               TrainConfig(data="u", method="mmrl", rep_tokens=40, rep_dim=512)).prompt
    assert mm.rep.shape == (40, 512) and 0.018 < mm.rep.std() < 0.022
    assert len(mm.to_visual) == 3 and len(mm.to_text) == 2  # micro: 4 visual layers from layer 2, 3 text from 2
    for group, width in ((mm.to_visual, 128), (mm.to_text, 64)):
        assert all(torch.equal(p.weight, group[0].weight) and torch.equal(p.bias, group[0].bias) for p in group)
        assert group[0].weight.shape == (width, 512) and group[0].weight.abs().max() <= 512 ** -0.5
    assert mm.proj_rep.shape == (128, 128) and 0.9 * 128 ** -0.5 < mm.proj_rep.std() < 1.1 * 128 ** -0.5
    assert mm.fusion == {"base": (0.7, pytest.approx(0.3)), "new": (1.0, 0.0)} and mm.logit_scale == 100.0
    assert mm.template == "a photo of a {}."


# ---- stage 1: one step -------------------------------------------------------------------------------------------
def reference_stage1(backbone, name: str, weights: dict, pixels, targets, labels, cfg) -> dict[str, torch.Tensor]:
    """The stage-1 objective from open_clip's forward and the plain formulas."""
    template = cfg.mmrl_template or "a photo of a {}."
    text = reference_text(backbone, name, weights, labels, template)
    kinds = reference_features(backbone, name, weights, pixels)
    f_clip = ref.image_features(backbone.model, pixels)
    s = backbone.logit_scale
    if name == "promptsrc":
        teacher = ref.teacher_text(backbone.model, backbone.tokenizer, labels, TEACHER_TEMPLATES)
        return ref.promptsrc_loss(s * kinds[0] @ text.t(), s * f_clip @ teacher.t(), text, teacher, kinds[0], f_clip,
                                  targets, cfg.text_loss_weight, cfg.image_loss_weight)
    teacher = ref.text_features(backbone.model, backbone.tokenizer, [template.format(ref.words(c)) for c in labels])
    return ref.mmrl_loss(100 * kinds[0] @ text.t(), 100 * kinds[1] @ text.t(), kinds[0], f_clip, text, teacher,
                         targets, cfg.mmrl_alpha, cfg.reg_weight)


@pytest.mark.parametrize("name", list(METHODS))
def test_stage1_step_wiring(backbone, index, name):
    """FVGPTModel.prompt_loss with the learner's teacher: every term and every gradient of the learner equal the
    reference's; CLIP receives none. Non-default weights, so a weight taken from the wrong field shows."""
    classes = base_split(index.classnames)
    overrides = ({"text_loss_weight": 3.0, "image_loss_weight": 7.0} if name == "promptsrc"
                 else {"mmrl_alpha": 0.6, "reg_weight": 2.5, "mmrl_template": "itap of a {}."})
    model = learner_model(backbone, classes, name, **overrides)
    samples, pixels, _ = images(backbone, index, classes)
    position = {label: i for i, label in enumerate(classes.base_ids)}
    targets = torch.tensor([position[s.label] for s in samples])
    base = classes.base_names
    teacher = model.prompt.teacher(model, base)
    out = model.prompt_loss(pixels, targets, base, teacher)
    out["loss"].backward()
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in model.prompt.state_dict().items()}
    want = reference_stage1(backbone, name, leaves, pixels, targets, base, model.cfg)
    assert set(out) == set(want)
    for key, value in want.items():
        assert torch.allclose(out[key].double(), value, rtol=1e-4, atol=1e-6), (key, out[key], value)
    grads = dict(zip(leaves, torch.autograd.grad(want["loss"], list(leaves.values()), allow_unused=True)))
    for key, p in model.prompt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
        assert torch.allclose(p.grad.double(), grads[key].double(), rtol=1e-3, atol=1e-6), key
    assert all(p.grad is None for p in backbone.model.parameters())


# ---- stage 1: the stage, interrupted and resumed -----------------------------------------------------------------
class Interrupted(Exception):
    pass


@pytest.mark.parametrize("name", ["promptsrc", "mmrl_trunk"])
def test_stage1_run_replays_with_its_optimiser(backbone, index, name, tmp_path):
    """train_prompt for 3 epochs, interrupted after epoch 1 and resumed in a fresh model: replaying the recorded
    batches with the reference objective and the method's optimiser (PromptSRC: SGD with momentum; MMRL: AdamW),
    warm-up then cosine, reproduces the weights before every step; the saved learner is PromptSRC's Gaussian
    aggregate Σ_e w_e·θ_e of the weights after each epoch, MMRL's last weights. The log has every term."""
    classes = base_split(index.classnames)
    cfg = config(name, seed=3, prompt_epochs=3, prompt_lr=0.05 if name == "promptsrc" else 0.01, prompt_batch=4,
                 gpa_mean=2.2, gpa_std=0.8)
    assert cfg.optimizer == ("sgd" if name == "promptsrc" else "adamw") and cfg.prompt_augment
    run = tmp_path / "run"
    run.mkdir()
    (run / "progress.json").write_text("{}")
    steps, after_epoch = [], {}

    def model_for_run() -> FVGPTModel:
        torch.manual_seed(11)
        model = FVGPTModel.new_prompt(backbone, classes, cfg)
        real = model.prompt_loss

        def prompt_loss(pixels, targets, labels, teacher):
            steps.append({"pixels": pixels.clone(), "targets": targets.clone(),
                          "weights": copy.deepcopy(model.prompt.state_dict())})
            return real(pixels, targets, labels, teacher)

        model.prompt_loss = prompt_loss
        return model

    def hook(stage, epoch):
        after_epoch[epoch] = copy.deepcopy(models[-1].prompt.state_dict())
        if epoch == 1 and len(models) == 1:
            raise Interrupted

    models = [model_for_run()]
    with pytest.raises(Interrupted):
        train_prompt(models[0], run, index, hook, progress=False)
    state = torch.load(run / "state" / "prompt.pt", weights_only=True)
    assert state["epoch"] == 1 and ("average" in state) == (name == "promptsrc")
    models.append(model_for_run())
    train_prompt(models[1], run, index, hook, progress=False)
    assert len(steps) == 6  # 6 base images in batches of 4: 2 steps × 3 epochs

    params = {k: v.double().clone() for k, v in steps[0]["weights"].items()}
    optimiser_state: dict = {}
    for i, step in enumerate(steps):
        for k, v in step["weights"].items():
            assert torch.allclose(v.double(), params[k], atol=5e-6), f"step {i}: {k} differs from the replay"
        leaves = {k: v.float().clone().requires_grad_(True) for k, v in params.items()}
        want = reference_stage1(backbone, name, leaves, step["pixels"], step["targets"], classes.base_names, cfg)
        grads = {k: g.double() for k, g in zip(leaves, torch.autograd.grad(want["loss"], list(leaves.values())))}
        lr = ref.lr_at(i // 2, 3, cfg.prompt_lr)
        with torch.no_grad():
            if name == "promptsrc":
                ref.sgd_step(params, grads, optimiser_state, lr)
            else:
                ref.adamw_step(params, grads, optimiser_state, lr)
        if i % 2 == 1:
            assert all(torch.allclose(after_epoch[i // 2 + 1][k].double(), params[k], atol=5e-6) for k in params)
    saved = read_tensors(run / "prompt.safetensors")
    if name == "promptsrc":
        w = ref.gpa_weights(3, 2.2, 0.8)
        assert min(w) > 0.01  # every epoch counts, so an epoch left out shows
        final = {k: sum(w[e] * after_epoch[e + 1][k].double() for e in range(3)) for k in params}
    else:
        final = params
    for k, v in final.items():
        assert torch.allclose(saved[k].double(), v, atol=5e-6), k
        assert torch.equal(models[-1].prompt.state_dict()[k], saved[k]), k
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    terms = {"promptsrc": {"ce", "scl_text", "scl_image", "scl_logits"}}.get(name, {"ce_class", "ce_rep", "reg_image",
                                                                                     "reg_text"})
    assert [r["epoch"] for r in log] == [1, 2, 3] and all(terms | {"loss"} <= set(r) for r in log)
    assert [r["lr"] for r in log] == pytest.approx([1e-5] + [ref.lr_at(e, 3, cfg.prompt_lr) for e in (1, 2)])
    assert read_learner(run, backbone, cfg).state_dict().keys() == saved.keys()


def test_coop_and_kgcoop_learners_save_load_and_teach(backbone, tmp_path):
    """CoOp's learner through prompt.safetensors and back; KgCoOp's regulariser pulls toward the zero-shot template's
    text features, CoOp has none; zero-shot CLIP and MMRL have no text context."""
    from fvgpt.rundir import atomic_save_tensors

    classes = base_split(["a", "b", "c", "d", "e", "f"])
    for method in ("coop", "kgcoop"):
        cfg = TrainConfig(data="unused", method=method)
        model = FVGPTModel.new_prompt(backbone, classes, cfg)
        atomic_save_tensors(tmp_path / "prompt.safetensors", model.prompt.state_dict())
        loaded = read_learner(tmp_path, backbone, cfg)
        assert torch.equal(loaded.ctx, model.prompt.ctx) and type(loaded) is type(model.prompt)
        teacher = model.prompt.teacher(model, ["red circle", "a b"])
        if method == "coop":
            assert teacher is None
        else:
            want = ref.text_features(backbone.model, backbone.tokenizer, ref.zero_shot_texts(["red circle", "a b"]))
            assert torch.allclose(teacher, want, atol=1e-6)
    assert FVGPTModel(backbone, classes).context is None
    assert FVGPTModel.new_prompt(backbone, classes, config("mmrl")).context is None
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    coop = FVGPTModel.new_prompt(backbone, classes, TrainConfig(data="unused"))
    assert torch.equal(coop.encode_tuned(pixels), coop.encode_image(pixels).unsqueeze(1))  # one feature: CLIP's


def test_the_learners_need_a_clip_vit(backbone, monkeypatch, tmp_path):
    """PromptSRC and MMRL loop over a CLIP ViT's blocks: another image tower is refused, naming the method, when a
    learner is made and when one is read."""
    from fvgpt.backbone import BackboneError
    from fvgpt.rundir import atomic_save_tensors

    classes = base_split(["a", "b", "c", "d", "e", "f"])
    for name in ("promptsrc", "mmrl"):
        model = FVGPTModel.new_prompt(backbone, classes, config(name))
        atomic_save_tensors(tmp_path / "prompt.safetensors", model.prompt.state_dict())
        with monkeypatch.context() as mp:
            mp.setattr(backbone.model.visual, "pool_type", "avg")
            with pytest.raises(BackboneError, match=f"fvgpt-tiny: {name} needs a CLIP ViT image tower"):
                FVGPTModel.new_prompt(backbone, classes, config(name))
            with pytest.raises(BackboneError, match=f"{name} needs a CLIP ViT"):
                read_learner(tmp_path, backbone, config(name))


def test_a_learner_of_another_method_is_refused(backbone, tmp_path):
    """prompt.safetensors of one method read as another's: a RunDirError naming the file and the method."""
    classes = base_split(["a", "b", "c", "d", "e", "f"])
    model = FVGPTModel.new_prompt(backbone, classes, config("promptsrc"))
    from fvgpt.rundir import atomic_save_tensors

    atomic_save_tensors(tmp_path / "prompt.safetensors", model.prompt.state_dict())
    with pytest.raises(RunDirError, match=r"prompt\.safetensors does not hold a mmrl learner"):
        read_learner(tmp_path, backbone, config("mmrl"))


# ---- stage 2 ----------------------------------------------------------------------------------------------------
def fused(name: str, cfg: TrainConfig, s: float) -> tuple[float, tuple, tuple]:
    """(s_b, base weights, new weights) of the learner, written out: PromptSRC the backbone's s and one kind; MMRL
    100, (α, 1 − α) and (1, 0)."""
    return (s, (1.0,), (1.0,)) if name == "promptsrc" else (100.0, (cfg.mmrl_alpha, 1 - cfg.mmrl_alpha), (1.0, 0.0))


@pytest.mark.parametrize("name", list(METHODS))
def test_stage2_step_wiring(backbone, index, name):
    """FVGPTModel.plugin_loss on a frozen learner: z_full (MMRL fused 0.7·z_c + 0.3·z_r) and z_fg from the learner's
    own tower on x and on x_fg, z_CLIP from CLIP's tower on x, Prior Calibration on the learner's new-class logits
    (MMRL: z_c), one MLP_v on each of MMRL's features; every term and plugin gradient equal the reference; the
    learner and CLIP receive none. Passes per image: PromptSRC 3, MMRL 2 + the branch (the trunk is shared on x)."""
    classes = base_split(index.classnames)
    model = learner_model(backbone, classes, name)
    model.cfg = config(name, mmrl_alpha=0.6) if name != "promptsrc" else model.cfg
    if name != "promptsrc":
        model.prompt.fusion = {"base": (0.6, 0.4), "new": (1.0, 0.0)}
    model.prompt.requires_grad_(False)
    plugin = model.new_plugin(S_FDC)
    perturb(plugin, 2)
    samples, pixels, masks = images(backbone, index, classes)
    has_mask = torch.tensor([1.0, 1, 1, 0, 1, 1])
    position = {label: i for i, label in enumerate(classes.base_ids)}
    targets = torch.tensor([position[s.label] for s in samples])
    tables = model.tables(classes.base_names)
    calls = BlockCalls(backbone)
    try:
        out = model.plugin_loss(pixels, masks, has_mask, targets, tables)
    finally:
        calls.close()
    out["loss"].backward()
    n_blocks = len(calls.blocks)
    trunk = 0 if name == "promptsrc" else n_blocks - len(model.prompt.to_visual)
    assert calls.images == [12] * trunk + [18] * (n_blocks - trunk)  # x: CLIP + learner (trunk once); x_fg: learner

    weights = {k: v.detach() for k, v in model.prompt.state_dict().items()}
    s = backbone.logit_scale
    s_b, base_w, new_w = fused(name, model.cfg, s)
    kinds = reference_features(backbone, name, weights, pixels)
    kinds_fg = reference_features(backbone, name, weights, ref.foreground(pixels, masks))
    text = reference_text(backbone, name, weights, classes.base_names)
    clip_text = ref.text_features(backbone.model, backbone.tokenizer, ref.zero_shot_texts(classes.base_names))
    plugin_weights = dict(plugin.named_parameters())
    h = ref.fused_heads(plugin_weights, kinds, ref.image_features(backbone.model, pixels), text, clip_text,
                        s_b, s, S_FDC, base_w, new_w)
    z_fg = sum(w * s_b * f.double() @ text.double().t() for w, f in zip(base_w, kinds_fg))
    area = masks.sum(dim=(1, 2, 3)) / (64 * 64)
    want = ref.loss_terms(plugin_weights, h["z_full"], z_fg, h["z_clip"], h["z_fdc"], h["z_pc"], h["b"], area,
                          has_mask, targets)
    for key in ("loss", "base", "frg", "dist", "pc", "r", "r_star", "b"):
        assert torch.allclose(out[key].double(), want[key], rtol=1e-4, atol=1e-6), (key, out[key], want[key])
    if name != "promptsrc":
        assert not torch.allclose(h["z_new"], h["z_full"], atol=1e-2)  # MMRL's new head reads z_c, not the fusion
    f = model.encode_image(pixels)
    heads = model.heads(f, tables)
    for key in ("z_full", "z_new", "z_clip", "z_fdc", "z_pc", "b"):
        assert torch.allclose(getattr(heads, key).double(), h[key], atol=1e-4), key
    z_pc, b = model.new_head(f, tables.learned, tables.clip)  # the export's new head: the same as heads()
    assert torch.equal(z_pc, heads.z_pc) and torch.equal(b, heads.b)
    assert torch.allclose(model.base_head(f, model.adapted_text(tables.learned)), heads.z_fdc)
    grads = torch.autograd.grad(want["loss"], list(plugin_weights.values()))
    for (key, p), g in zip(plugin.named_parameters(), grads):
        assert p.grad is not None and torch.allclose(p.grad, g.float(), rtol=1e-3, atol=1e-6), key
    assert all(p.grad is None for p in model.prompt.parameters())
    assert all(p.grad is None for p in backbone.model.parameters())


@pytest.mark.parametrize("name", ["promptsrc", "mmrl_trunk"])
def test_stage2_run_and_evaluation_rows(backbone, index, name, tmp_path):
    """train_plugin on a frozen learner leaves the learner bit-identical and trains the plugin (AdamW for MMRL: the
    FVGPT_MMRL config); evaluate() reports the stage-1 row from z_full on base and z_new on new (MMRL: the fused and
    the class-token logits), FVG-PT from z_FDC / z_PC, each recomputed from the heads; features of other towers are
    refused."""
    classes = base_split(index.classnames)
    model = learner_model(backbone, classes, name, plugin_epochs=2, plugin_lr=0.02, plugin_batch=4, seed=5)
    model.prompt.requires_grad_(False)
    before = copy.deepcopy(model.prompt.state_dict())
    run = tmp_path / "run"
    run.mkdir()
    (run / "progress.json").write_text("{}")
    train_plugin(model, run, index, S_FDC, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.prompt.state_dict().items())
    state = torch.load(run / "state" / "plugin.pt", weights_only=True)
    assert set(state["optimizer"]["state"][0]) == ({"momentum_buffer"} if name == "promptsrc"
                                                   else {"step", "exp_avg", "exp_avg_sq"})
    method = model.cfg.method
    assert model_rows(model)[method] == ("z_full", "z_new")
    metrics = evaluate(model, index, 32, progress=False)
    feats = eval_features(model, index, 32, progress=False)
    f, labels = feats.f, feats.labels
    is_base = torch.tensor(classes.base, dtype=torch.bool)[labels]
    target = torch.tensor(classes.position)[labels]
    on_base = model.heads(f[is_base], model.tables(classes.base_names))
    on_new = model.heads(f[~is_base], model.tables(classes.new_names))

    def acc(z, y):
        return float((z.argmax(-1) == y).float().mean() * 100)

    row = metrics["models"][method]
    assert row["base"] == pytest.approx(acc(on_base.z_full, target[is_base]))
    assert row["new"] == pytest.approx(acc(on_new.z_new, target[~is_base]))
    assert metrics["models"]["fvgpt"]["new"] == pytest.approx(acc(on_new.z_pc, target[~is_base]))
    other = FVGPTModel(backbone, classes, model.cfg)  # zero-shot: CLIP's tower only
    with pytest.raises(ValueError, match="features of towers"):
        evaluate(other, index, 32, progress=False, features=feats)
    assert re.fullmatch(f"{method}-[0-9a-f]{{16}}", feats.towers)
    assert eval_features(other, index, 32, progress=False).towers == "clip"
    assert math.isfinite(metrics["models"]["fvgpt"]["hm"])
    model.cfg = dataclasses.replace(model.cfg, fdc=False)  # PC only: no base branch, so no foreground gate to report
    gates = evaluate(model, index, 32, progress=False, features=feats)["gates"]
    assert gates["frg"] is None and metrics["gates"]["frg"]["r"]["n"] > 0
