"""The method written out again for the tests, from docs/method.md's equations, in plain float64 torch.

Nothing here calls fvgpt: these are the independent expectations the method tests compare fvgpt against (its KL,
entropy, gates, adapters, heads, losses, text encoding with a learned context, foreground view and optimiser).
The plugin's weights are read from its state dict (the layout is the object under test, the arithmetic is ours).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The defaults docs/method.md states, written down here once more (tests/test_method_defaults.py pins the config and
# the docs table to these; the reference computations below use them).
TAU = 2.0
LAMBDA_D = 10.0
LAMBDA_RG = 1.0
LAMBDA_NEW = 1.0
DELTA = 0.0
AREA_MIN, AREA_MAX = 0.02, 0.98
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
WARMUP_EPOCHS, WARMUP_LR = 1, 1e-5


# ---- distributions ------------------------------------------------------------------------------------------------
def probs(z: torch.Tensor, tau: float) -> torch.Tensor:
    """p = softmax(z/τ), computed as exp(z/τ − max) / Σ exp(z/τ − max)."""
    z = z.double() / tau
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def log_probs(z: torch.Tensor, tau: float) -> torch.Tensor:
    z = z.double() / tau
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample KL(softmax(p/τ) ‖ softmax(q/τ)) = Σ_c p_c (log p_c − log q_c): the first argument is the one
    expectations are taken under."""
    log_p, log_q = log_probs(p_logits, tau), log_probs(q_logits, tau)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def entropy(z: torch.Tensor, tau: float) -> torch.Tensor:
    log_p = log_probs(z, tau)
    return -(log_p.exp() * log_p).sum(-1)


def prob_cos(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    p, q = probs(a, tau), probs(b, tau)
    return (p * q).sum(-1) / (p.norm(dim=-1) * q.norm(dim=-1))


def ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy −log softmax(z)_y on raw logits (no τ)."""
    z = z.double()
    return torch.logsumexp(z, dim=-1) - z.gather(-1, y.view(-1, 1)).squeeze(-1)


def bce_with_logits(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample −[t·log σ(x) + (1 − t)·log(1 − σ(x))]."""
    x, target = x.double(), target.double()
    return -(target * F.logsigmoid(x) + (1 - target) * F.logsigmoid(-x))


def l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ---- the plugin ---------------------------------------------------------------------------------------------------
def mlp(x: torch.Tensor, weights: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Linear → ReLU → Linear from `prefix.mlp.{0,2}.{weight,bias}` of a plugin state dict."""
    w1, b1 = weights[f"{prefix}.mlp.0.weight"].double(), weights[f"{prefix}.mlp.0.bias"].double()
    w2, b2 = weights[f"{prefix}.mlp.2.weight"].double(), weights[f"{prefix}.mlp.2.bias"].double()
    return torch.clamp(x.double() @ w1.t() + b1, min=0) @ w2.t() + b2


def frg_inputs(z_full, z_fg, area, tau: float = TAU) -> torch.Tensor:
    """E1: u = [H(p_full) − H(p_fg), cos(p_full, p_fg), A]."""
    return torch.stack([entropy(z_full, tau) - entropy(z_fg, tau), prob_cos(z_full, z_fg, tau), area.double()], -1)


def brg_inputs(z_full, z_clip, tau: float = TAU) -> torch.Tensor:
    """E9: s = [H(p_full), H(p_CLIP), cos(p_full, p_CLIP)]."""
    return torch.stack([entropy(z_full, tau), entropy(z_clip, tau), prob_cos(z_full, z_clip, tau)], -1)


def gate_logit(stats: torch.Tensor, weights: dict, name: str) -> torch.Tensor:
    """E2 / E10 before the sigmoid."""
    return mlp(stats, weights, name).squeeze(-1)


def heads(weights: dict, f, text, clip_text, s: float, big_s: float, tau: float = TAU, fdc: bool = True,
          prior_calibration: bool = True) -> dict[str, torch.Tensor]:
    """Every head on image features f (E5, E6, E9–E11), from plain formulas. The ablations (docs/method.md,
    "Ablations"): without FDC the base head is z_full; without Prior Calibration the new head is the base head over
    the same labels (the adapters' logits, or z_full when FDC is off too) and b = 0."""
    f, text, clip_text = f.double(), text.double(), clip_text.double()
    z_full, z_clip = s * f @ text.t(), s * f @ clip_text.t()
    f_t = l2(f + mlp(f, weights, "image_adapter"))
    g_t = l2(text + mlp(text, weights, "text_adapter"))
    z_fdc = big_s * f_t @ g_t.t() if fdc else z_full
    if not prior_calibration:
        return {"z_full": z_full, "z_clip": z_clip, "z_fdc": z_fdc, "z_pc": z_fdc,
                "b": torch.zeros(len(f), dtype=torch.float64)}
    b = torch.sigmoid(gate_logit(brg_inputs(z_full, z_clip, tau), weights, "brg"))
    return {"z_full": z_full, "z_clip": z_clip, "z_fdc": z_fdc,
            "z_pc": (1 - b)[:, None] * z_full + b[:, None] * z_clip, "b": b}


def loss_terms(weights: dict, z_full, z_fg, z_clip, z_fdc, z_pc, b, area, has_mask, y, tau: float = TAU,
               lambda_d: float = LAMBDA_D, lambda_rg: float = LAMBDA_RG, lambda_new: float = LAMBDA_NEW,
               delta: float = DELTA, pc_kl: bool = True, area_min: float = AREA_MIN,
               area_max: float = AREA_MAX, fdc: bool = True, frg: bool = True,
               prior_calibration: bool = True) -> dict[str, torch.Tensor]:
    """E1–E4, E7, E8, E12, E14 from the heads' logits and the frozen model's logits on the foreground view, with the
    ablations: frg=False makes every usable foreground view the teacher (r = 1 there) and L_FRG = 0; fdc=False drops
    the whole base branch (L_base = L_FRG = L_dist = 0, r = 0); prior_calibration=False makes L_PC = 0."""
    usable = has_mask.bool() & (area >= area_min) & (area <= area_max)
    r_logit = gate_logit(frg_inputs(z_full, z_fg, area, tau), weights, "frg")
    r = torch.where(usable, torch.sigmoid(r_logit), torch.zeros_like(r_logit))
    r_star = (ce(z_fg, y) + delta < ce(z_full, y)).double()
    l_frg = bce_with_logits(r_logit[usable], r_star[usable]).mean() if usable.any() else r_logit.sum() * 0
    if not frg:
        r, l_frg = usable.double(), torch.zeros((), dtype=torch.float64)
    if not fdc:
        r, l_frg = torch.zeros(len(y), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    rd = r.detach()
    l_dist = (rd * kl(z_fg, z_fdc, tau) + (1 - rd) * kl(z_full, z_fdc, tau)).mean() * fdc
    l_base = (ce(z_fdc, y).mean() + lambda_rg * l_frg + lambda_d * l_dist) * fdc
    l_pc = (ce(z_pc, y).mean() + (kl(z_clip, z_pc, tau).mean() if pc_kl else 0)) * prior_calibration
    return {"loss": l_base + lambda_new * l_pc, "base": l_base, "frg": l_frg, "dist": l_dist, "pc": l_pc,
            "r": r.mean(), "r_star": r_star.mean(), "b": b.double().mean(), "usable": usable}


def objective(weights: dict, f, f_fg, text, clip_text, area, has_mask, y, s: float, big_s: float,
              **hyper) -> dict[str, torch.Tensor]:
    """One stage-2 batch from the frozen tower's features of x (f) and of x_fg (f_fg)."""
    h = heads(weights, f, text, clip_text, s, big_s, hyper.get("tau", TAU), hyper.get("fdc", True),
              hyper.get("prior_calibration", True))
    z_fg = s * f_fg.double() @ text.double().t()
    return loss_terms(weights, h["z_full"], z_fg, h["z_clip"], h["z_fdc"], h["z_pc"], h["b"], area, has_mask, y,
                      **hyper)


# ---- the frozen CLIP, through open_clip's own forward -------------------------------------------------------------
def image_features(clip_model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(clip_model.encode_image(pixels), dim=-1)


def text_features(clip_model, tokenizer, texts: list[str], context: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's encode_text; with `context`, the token embeddings at positions 1..n_ctx (the placeholders after
    the start token) are replaced by the context vectors (CoOp), through a forward hook on the embedding."""
    def splice(_module, _inputs, out):
        out = out.clone()
        out[:, 1:1 + context.shape[0]] = context.to(out.dtype)
        return out

    handle = clip_model.token_embedding.register_forward_hook(splice) if context is not None else None
    try:  # autograd only where a context asks for gradients (PromptSRC's stage-1 reference)
        with torch.set_grad_enabled(context is not None and context.requires_grad):
            return F.normalize(clip_model.encode_text(tokenizer(texts)), dim=-1)
    finally:
        if handle is not None:
            handle.remove()


def words(label: str) -> str:
    return " ".join(label.replace("_", " ").split())


def learned_texts(labels: list[str], n_ctx: int) -> list[str]:
    return [" ".join(["X"] * n_ctx) + f" {words(c)}." for c in labels]


def zero_shot_texts(labels: list[str]) -> list[str]:
    return [f"a photo of a {words(c)}." for c in labels]


def foreground(pixels: torch.Tensor, masks: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """x_fg: the foreground kept, the background CLIP's mean colour (0 in normalised space), or pixel black (the
    normalised value of 0) when the normalisation's mean and std are given."""
    background = torch.zeros(3) if mean is None else -torch.tensor(mean) / torch.tensor(std)
    return torch.where(masks.bool().expand_as(pixels), pixels, background.view(1, 3, 1, 1).expand_as(pixels))


# ---- optimiser and schedule ---------------------------------------------------------------------------------------
def lr_at(epoch: int, epochs: int, lr: float) -> float:
    """Dassl: the warm-up LR for the first epoch, then cosine annealing over all epochs."""
    return WARMUP_LR if epoch < WARMUP_EPOCHS else lr * (1 + math.cos(math.pi * epoch / epochs)) / 2


def sgd_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
             lr: float) -> None:
    """SGD with momentum and L2 weight decay (no dampening, no Nesterov), in place, float64."""
    for name, p in params.items():
        d = grads[name] + WEIGHT_DECAY * p
        buffers[name] = d if name not in buffers else MOMENTUM * buffers[name] + d
        p -= lr * buffers[name]


# ---- PromptSRC and MMRL: their towers through open_clip's own forward, their objectives -------------------------
# The prompts and representation tokens go in through hooks on open_clip's modules (never fvgpt's block loops):
# a forward hook on the visual patch_dropout (the last step before ln_pre), forward pre-hooks on the resblocks, and
# a forward hook on ln_post / ln_final to read every token.

class Hooks:
    """Hooks registered for one forward, removed on exit."""

    def __init__(self):
        self.handles = []

    def pre(self, module, fn, with_kwargs: bool = False):
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def post(self, module, fn):
        self.handles.append(module.register_forward_hook(fn))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def expand(tokens: torch.Tensor, batch: int) -> torch.Tensor:
    return tokens.unsqueeze(0).expand(batch, -1, -1)


def promptsrc_image(clip_model, pixels, vision_ctx, vision_deep) -> torch.Tensor:
    """PromptSRC's prompted image features: the prompt tokens appended before ln_pre, the last n tokens replaced at the
    input of blocks 1..len(deep); open_clip's encode_image (class token, proj); L2-normalised."""
    visual, n = clip_model.visual, vision_ctx.shape[0]
    with Hooks() as h:
        h.post(visual.patch_dropout, lambda _m, _i, out: torch.cat([out, expand(vision_ctx, len(out))], 1))
        for i in range(1, len(vision_deep) + 1):
            h.pre(visual.transformer.resblocks[i],
                  lambda _m, args, d=vision_deep[i - 1]: (torch.cat([args[0][:, :-n], expand(d, len(args[0]))], 1),))
        return F.normalize(clip_model.encode_image(pixels), dim=-1)


def promptsrc_text(clip_model, tokenizer, texts: list[str], ctx, deep) -> torch.Tensor:
    """PromptSRC's prompted text features: CoOp's context at positions 1..n, replaced again at the input of text
    blocks 1..len(deep); open_clip's encode_text; L2-normalised."""
    n = ctx.shape[0]

    def replace(_m, args, d):
        x = args[0]
        return (torch.cat([x[:, :1], expand(d, len(x)), x[:, 1 + n:]], 1),)

    with Hooks() as h:
        for i in range(1, len(deep) + 1):
            h.pre(clip_model.transformer.resblocks[i], lambda m, a, d=deep[i - 1]: replace(m, a, d))
        return text_features(clip_model, tokenizer, texts, ctx)


def teacher_text(clip_model, tokenizer, labels: list[str], templates) -> torch.Tensor:
    """L2 of the mean over templates of CLIP's unnormalised text features (PromptSRC's fixed embeddings)."""
    with torch.no_grad():
        feats = torch.stack([clip_model.encode_text(tokenizer([t.format(words(c)) for c in labels]))
                             for t in templates])
    return l2(feats.mean(0))


def mmrl_image(clip_model, pixels, tokens, proj_rep) -> tuple[torch.Tensor, torch.Tensor]:
    """MMRL's (f_c, f_r): the layers' tokens R_v (K, n, W) inserted after the class token at the input of block
    L − K, overwriting those positions at every later block; f_c = open_clip's encode_image, f_r = the mean of
    ln_post(representation tokens) · P_r; both L2-normalised."""
    visual = clip_model.visual
    blocks = visual.transformer.resblocks
    start, n = len(blocks) - len(tokens), tokens.shape[1]
    seen = {}

    def put(_m, args, k):
        x = args[0]
        return (torch.cat([x[:, :1], expand(tokens[k], len(x)), x[:, 1 + (n if k else 0):]], 1),)

    with Hooks() as h:
        for k in range(len(tokens)):
            h.pre(blocks[start + k], lambda m, a, k=k: put(m, a, k))
        h.post(visual.ln_post, lambda _m, _i, out: seen.setdefault("tokens", out))
        f_c = F.normalize(clip_model.encode_image(pixels), dim=-1)
    return f_c, F.normalize(seen["tokens"][:, 1:1 + n].mean(1) @ proj_rep, dim=-1)


def mmrl_text(clip_model, tokenizer, texts: list[str], tokens) -> torch.Tensor:
    """MMRL's text features: R_t (K, n, W) inserted after the start token at the input of text block L − K and
    overwritten later, with a causal mask grown by n from that block on; the EOT token read n places later."""
    blocks = clip_model.transformer.resblocks
    start, n = len(blocks) - len(tokens), tokens.shape[1]
    ids = tokenizer(texts)
    seen = {}

    def put(_m, args, kwargs, k):
        x = args[0]
        x = torch.cat([x[:, :1], expand(tokens[k], len(x)), x[:, 1 + (n if k else 0):]], 1)
        size = x.shape[1]
        mask = torch.triu(torch.full((size, size), float("-inf")), diagonal=1)
        return (x,), kwargs | {"attn_mask": mask}

    with Hooks() as h:
        for k in range(len(tokens)):
            h.pre(blocks[start + k], lambda m, a, kw, k=k: put(m, a, kw, k), with_kwargs=True)
        h.post(clip_model.ln_final, lambda _m, _i, out: seen.setdefault("tokens", out))
        clip_model.encode_text(ids)
    x = seen["tokens"]
    eot = ids.argmax(-1) + n
    return F.normalize(x[torch.arange(len(x)), eot] @ clip_model.text_projection, dim=-1)


def promptsrc_loss(z, z_clip, text, text_clip, image, image_clip, y, text_weight: float = 25.0,
                   image_weight: float = 10.0) -> dict[str, torch.Tensor]:
    """CE + text_weight·mean|G − G0| + image_weight·mean|f − f0| + Σ p0 (log p0 − log p) / (B·C), p at τ = 1."""
    log_p, log_p0 = log_probs(z, 1.0), log_probs(z_clip, 1.0)
    terms = {"ce": ce(z, y).mean(), "scl_text": (text.double() - text_clip.double()).abs().mean(),
             "scl_image": (image.double() - image_clip.double()).abs().mean(),
             "scl_logits": (log_p0.exp() * (log_p0 - log_p)).sum() / z.numel()}
    terms["loss"] = (terms["ce"] + text_weight * terms["scl_text"] + image_weight * terms["scl_image"]
                     + terms["scl_logits"])
    return terms


def cos_rows(a, b) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def mmrl_loss(z_c, z_r, f_c, f_clip, text, text_clip, y, alpha: float = 0.7,
              reg: float = 1.0) -> dict[str, torch.Tensor]:
    """α·CE(z_c) + (1 − α)·CE(z_r) + λ·(1 − mean cos(f_c, f0)) + λ·(1 − mean cos(g, g0))."""
    terms = {"ce_class": ce(z_c, y).mean(), "ce_rep": ce(z_r, y).mean(),
             "reg_image": 1 - cos_rows(f_c, f_clip).mean(), "reg_text": 1 - cos_rows(text, text_clip).mean()}
    terms["loss"] = (alpha * terms["ce_class"] + (1 - alpha) * terms["ce_rep"] + reg * terms["reg_image"]
                     + reg * terms["reg_text"])
    return terms


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """PromptSRC's Gaussian weights of epochs 1..E: N(e; μ, σ) normalised to sum 1."""
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    return [d / sum(density) for d in density]


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def adamw_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], state: dict, lr: float,
               weight_decay: float = WEIGHT_DECAY) -> None:
    """AdamW (decoupled weight decay, bias-corrected moments), in place, float64."""
    state["t"] = state.get("t", 0) + 1
    t, (b1, b2) = state["t"], ADAM_BETAS
    for name, p in params.items():
        g = grads[name]
        m = state.setdefault(("m", name), torch.zeros_like(p))
        v = state.setdefault(("v", name), torch.zeros_like(p))
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        p.mul_(1 - lr * weight_decay)
        p -= lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + ADAM_EPS)


def fused_heads(weights: dict, kinds: list[torch.Tensor], f_clip, text, clip_text, s_b: float, s: float,
                big_s: float, base_w: tuple[float, ...], new_w: tuple[float, ...],
                tau: float = TAU) -> dict[str, torch.Tensor]:
    """The heads of a stage-1 model with K image features per image (MMRL: f_c, f_r): z = s_b·f_k·Tᵀ per kind, fused
    with base_w (z_full) and new_w (z_new, the BRG's input); z_FDC fuses S·L2(f_k + MLP_v(f_k))·G̃ᵀ with base_w."""
    text, clip_text = text.double(), clip_text.double()
    per_kind = [s_b * f.double() @ text.t() for f in kinds]
    z_full = sum(w * z for w, z in zip(base_w, per_kind))
    z_new = sum(w * z for w, z in zip(new_w, per_kind))
    z_clip = s * f_clip.double() @ clip_text.t()
    g_t = l2(text + mlp(text, weights, "text_adapter"))
    z_fdc = sum(w * big_s * l2(f.double() + mlp(f, weights, "image_adapter")) @ g_t.t() for w, f in zip(base_w, kinds))
    b = torch.sigmoid(gate_logit(brg_inputs(z_new, z_clip, tau), weights, "brg"))
    return {"z_full": z_full, "z_new": z_new, "z_clip": z_clip, "z_fdc": z_fdc,
            "z_pc": (1 - b)[:, None] * z_new + b[:, None] * z_clip, "b": b}
