"""Mutation testing of the method's code with mutmut (docs/testing.md, "Mutation testing").

    python -m tests.mutation.score --run     # build .mutation/, run mutmut on the method's scope, then report
    python -m tests.mutation.score           # report the last run again
    python -m tests.mutation.score --run --only 'fvgpt.losses.x_plugin_objective__mutmut_*,...'
                                             # only these mutants (mutmut's names, globs): the functions a change
                                             # touched; the report then counts only them

    python -m tests.mutation.score --run 'fvgpt.mmrl.*' ...   # only these mutants (fnmatch patterns), then report them

Scope: fvgpt/plugin.py, losses.py, stats.py, metrics.py, model.py, evaluate.py, the stage-2 part of train.py
(train_plugin and what it runs: _run_stage, _lr_at, _base_loader, _seed, _set_progress), and the stage-1 learners
of PromptSRC and MMRL with what they run (fvgpt/prompts.py, promptsrc.py, mmrl.py; train.py's train_prompt and
_optimizer; backbone.py's ViT pieces and TextEncoder; config.py's per-method defaults); the tests are the method tests
that [tool.mutmut] in pyproject.toml selects.

mutmut 3 cannot mutate decorated functions: evaluate(), its _features() and FVGPTModel.encode_image/tables carry
@torch.no_grad(), the learners' constructors are classmethods. So the run happens in .mutation/, a copy of fvgpt/
(plus tests/, docs/, pyproject.toml) in which each such single decorator (`@torch.no_grad()`, `@classmethod`,
`@staticmethod`, `@property`) above a def is rewritten as `name = decorator(name)` right after it: the same
behaviour, and every function of the scope gets mutants. The working tree itself is never touched.

The report counts killed mutants (a timeout counts as killed), survivors, and the survivors listed in EQUIVALENT
(no test can tell them apart from the original; each with its reason); the score is killed / (all − equivalent).
"""
from __future__ import annotations

import ast
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".mutation"
SCOPE = ["fvgpt.plugin.*", "fvgpt.losses.*", "fvgpt.stats.*", "fvgpt.metrics.*", "fvgpt.model.*",
         "fvgpt.evaluate.*", "fvgpt.prompts.*", "fvgpt.promptsrc.*", "fvgpt.mmrl.*"] + [
    f"fvgpt.train.x_{name}__mutmut_*" for name in ("train_plugin", "_run_stage", "_lr_at", "_base_loader", "_seed",
                                                   "_set_progress", "train_prompt", "_optimizer")] + [
    f"fvgpt.backbone.x_{name}__mutmut_*" for name in ("vit", "patch_tokens", "class_features")] + [
    "fvgpt.backbone.xǁTextEncoderǁ*", "fvgpt.config.xǁTrainConfigǁwith_method__mutmut_*",
    "fvgpt.config.x_mmrl_template__mutmut_*"]
UNDECORATED = ("torch.no_grad()", "classmethod", "staticmethod", "property")

CPU = ("device placement: the tests run on CPU, where .to(None), device=None or no map_location leave every tensor "
       "where it already is; a run on CUDA would kill it")
BATCH = ("evaluation is per image: the batch size only sets how many images go through the tower per call, never a "
         "result")
TWO_D = "the logits are 2-D (images × classes): axis 1 is the last axis"
ROWS = ("the features are 2-D (rows × D): axis 1, the default of F.cosine_similarity and F.normalize, is the last "
        "axis")
FP32 = ("a cast to the activations' dtype: the tests run in fp32, where the learner's tensors already are; a "
        "half-precision run would kill it")
# (function, "original → mutated" line as `mutmut show` prints it) → why no test on this host can kill it
EQUIVALENT: dict[tuple[str, str], str] = {
    ("fvgpt.evaluate.x_eval_features", 'loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, '
     'collate_fn=collate, → loader = torch.utils.data.DataLoader(dataset, collate_fn=collate,'): BATCH,
    ("fvgpt.evaluate.x_evaluate", "def evaluate(model: FVGPTModel, index: DatasetIndex, batch_size: int = 100, "
     "progress: bool = True, → def evaluate(model: FVGPTModel, index: DatasetIndex, batch_size: int = 101, "
     "progress: bool = True,"): BATCH,
    ("fvgpt.evaluate.x_eval_features", 'img = batch["img"].to(bb.device) → img = batch["img"].to(None)'): CPU,
    ("fvgpt.evaluate.x_eval_features", 'x_fg = foreground_view(img, batch["mask"].to(bb.device), bb.preprocess, '
     'model.cfg.fg_fill) → x_fg = foreground_view(img, batch["mask"].to(None), bb.preprocess, model.cfg.fg_fill)'): CPU,
    ("fvgpt.evaluate.x_eval_features", 'labels.append(batch["label"].to(bb.device)) → '
     'labels.append(batch["label"].to(None))'): CPU,
    ("fvgpt.evaluate.x_eval_features", 'has_mask.append(batch["has_mask"].to(bb.device)) → '
     'has_mask.append(batch["has_mask"].to(None))'): CPU,
    ("fvgpt.evaluate.x_eval_features", 'areas.append(batch["mask"].to(bb.device).mean(dim=(1, 2, 3))) → '
     'areas.append(batch["mask"].to(None).mean(dim=(1, 2, 3)))'): CPU,
    ("fvgpt.train.x__base_loader", "collate_fn=collate, num_workers=cfg.workers, drop_last=False) → "
     "collate_fn=collate, drop_last=False)"):
        "the tests load in the main process (workers = 0, the config's default and DataLoader's); what a worker "
        "process reads is the same",
    ("fvgpt.evaluate.x_eval_features", "num_workers=model.cfg.workers) → )"):
        "the tests load in the main process (workers = 0, the config's default and DataLoader's); what a worker "
        "process reads is the same",
    ("fvgpt.evaluate.x_evaluate", "is_base = torch.tensor(split.base, device=f.device)[labels] → "
     "is_base = torch.tensor(split.base, device=None)[labels]"): CPU,
    ("fvgpt.evaluate.x_evaluate", "is_base = torch.tensor(split.base, device=f.device)[labels] → "
     "is_base = torch.tensor(split.base, )[labels]"): CPU,
    ("fvgpt.evaluate.x_evaluate", "target = torch.tensor(split.position, device=f.device)[labels] → "
     "target = torch.tensor(split.position, device=None)[labels]"): CPU,
    ("fvgpt.evaluate.x_evaluate", "target = torch.tensor(split.position, device=f.device)[labels] → "
     "target = torch.tensor(split.position, )[labels]"): CPU,
    ("fvgpt.metrics.x_accuracy", "return float((logits.argmax(-1) == labels).float().mean() * 100) if len(labels) else "
     "None → return float((logits.argmax(+1) == labels).float().mean() * 100) if len(labels) else None"):
        "accuracy is given (N, C) logits, whose last axis is axis 1",
    ("fvgpt.model.xǁFVGPTModelǁnew_plugin", "fdc_logit_scale, c.tau).to(self.backbone.device) → "
     "fdc_logit_scale, c.tau).to(None)"): CPU,
    ("fvgpt.model.xǁFVGPTModelǁtables", "return TextTables(list(labels), clip if self.prompt is None else "
     "self.encode_text(labels, True), clip) → return TextTables(list(labels), clip if (self.prompt is None) and False "
     "else self.encode_text(labels, True), clip)"):
        "without a prompt, encode_text(labels, True) falls back to the zero-shot template: both branches give the same "
        "rows",
    ("fvgpt.model.xǁFVGPTModelǁtables", "clip = self.encode_text(labels, learned=False) → "
     "clip = self.encode_text(labels, learned=None)"): "None and False are both false for encode_text's `if learned`",
    ("fvgpt.stats.x_prob_cosine", "return F.cosine_similarity(p, q, dim=-1, eps=1e-12) → "
     "return F.cosine_similarity(p, q, dim=-1, )"):
        "cosine of probability vectors: their norms are at least 1/sqrt(C), far above either eps (1e-12 or the "
        "default 1e-8), so eps never acts",
    ("fvgpt.train.x__base_loader", "position = torch.tensor(classes.position, device=model.backbone.device) → "
     "position = torch.tensor(classes.position, )"): CPU,
    ("fvgpt.train.x__base_loader", "position = torch.tensor(classes.position, device=model.backbone.device) → "
     "position = torch.tensor(classes.position, device=None)"): CPU,
    ("fvgpt.train.x__base_loader", "return loader_for, lambda labels: position[labels.to(model.backbone.device)] → "
     "return loader_for, lambda labels: position[labels.to(None)]"): CPU,
    ("fvgpt.train.x__base_loader", "collate_fn=collate, num_workers=cfg.workers, drop_last=False) → "
     "collate_fn=collate, num_workers=cfg.workers, )"): "DataLoader's default is drop_last=False",
    ("fvgpt.train.x__run_stage", "state = torch.load(state_path, map_location=cfg.device, weights_only=True) → "
     "state = torch.load(state_path, map_location=None, weights_only=True)"): CPU,
    ("fvgpt.train.x__run_stage", "state = torch.load(state_path, map_location=cfg.device, weights_only=True) → "
     "state = torch.load(state_path, weights_only=True)"): CPU,
    ("fvgpt.train.x__run_stage", "state = torch.load(state_path, map_location=cfg.device, weights_only=True) → "
     "state = torch.load(state_path, map_location=cfg.device, weights_only=None)"):
        "torch ≥ 2.6 loads with weights_only=True by default (the project needs torch ≥ 2.13)",
    ("fvgpt.train.x__run_stage", "state = torch.load(state_path, map_location=cfg.device, weights_only=True) → "
     "state = torch.load(state_path, map_location=cfg.device, )"):
        "torch ≥ 2.6 loads with weights_only=True by default (the project needs torch ≥ 2.13)",
    ("fvgpt.train.x__run_stage", "opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, "
     "weight_decay=cfg.weight_decay) → opt = torch.optim.SGD(params, momentum=cfg.momentum, "
     "weight_decay=cfg.weight_decay)"):
        "every epoch sets the learning rate of every param group (_lr_at) before its first step",
    ("fvgpt.train.x__run_stage", "opt.zero_grad(set_to_none=True) → opt.zero_grad(set_to_none=None)"):
        "every plugin parameter gets a gradient in every step (a batch without usable masks keeps the FRG in the "
        "graph with a zero term), so zeroed and None gradients give the same SGD step",
    ("fvgpt.train.x__run_stage", "opt.zero_grad(set_to_none=True) → opt.zero_grad(set_to_none=False)"):
        "every plugin parameter gets a gradient in every step (a batch without usable masks keeps the FRG in the "
        "graph with a zero term), so zeroed and None gradients give the same SGD step",
    ("fvgpt.evaluate.x__brg_statistics", "full_right, clip_right = heads.z_new.argmax(-1) == target, "
     "heads.z_clip.argmax(-1) == target → full_right, clip_right = heads.z_new.argmax(+1) == target, "
     "heads.z_clip.argmax(-1) == target"): TWO_D,
    ("fvgpt.evaluate.x__brg_statistics", "full_right, clip_right = heads.z_new.argmax(-1) == target, "
     "heads.z_clip.argmax(-1) == target → full_right, clip_right = heads.z_new.argmax(-1) == target, "
     "heads.z_clip.argmax(+1) == target"): TWO_D,
    ("fvgpt.model.xǁFVGPTModelǁ_new_head", "return z_fdc.float(), torch.zeros(z_fdc.shape[0], device=z_fdc.device) "
     "→ return z_fdc.float(), torch.zeros(z_fdc.shape[0], device=None)"): CPU,
    ("fvgpt.model.xǁFVGPTModelǁ_new_head", "return z_fdc.float(), torch.zeros(z_fdc.shape[0], device=z_fdc.device) "
     "→ return z_fdc.float(), torch.zeros(z_fdc.shape[0], )"): CPU,
    ("fvgpt.losses.x_plugin_objective", "zero = torch.zeros((), device=labels.device) → "
     "zero = torch.zeros((), device=None)"): CPU,
    ("fvgpt.losses.x_plugin_objective", "zero = torch.zeros((), device=labels.device) → "
     "zero = torch.zeros((), )"): CPU,
    ("fvgpt.train.x_train_plugin", 'return model.plugin_loss(batch["img"].to(dev), batch["mask"].to(dev), '
     'batch["has_mask"].to(dev), → return model.plugin_loss(batch["img"].to(None), batch["mask"].to(dev), '
     'batch["has_mask"].to(dev),'): CPU,
    ("fvgpt.train.x_train_plugin", 'return model.plugin_loss(batch["img"].to(dev), batch["mask"].to(dev), '
     'batch["has_mask"].to(dev), → return model.plugin_loss(batch["img"].to(dev), batch["mask"].to(None), '
     'batch["has_mask"].to(dev),'): CPU,
    ("fvgpt.train.x_train_plugin", 'return model.plugin_loss(batch["img"].to(dev), batch["mask"].to(dev), '
     'batch["has_mask"].to(dev), → return model.plugin_loss(batch["img"].to(dev), batch["mask"].to(dev), '
     'batch["has_mask"].to(None),'): CPU,
    # PromptSRC and MMRL (issue 22)
    ("fvgpt.losses.x_mmrl_objective", "reg_image = 1 - F.cosine_similarity(image, image_clip, dim=-1).mean() → "
     "reg_image = 1 - F.cosine_similarity(image, image_clip, ).mean()"): ROWS,
    ("fvgpt.losses.x_mmrl_objective", "reg_image = 1 - F.cosine_similarity(image, image_clip, dim=-1).mean() → "
     "reg_image = 1 - F.cosine_similarity(image, image_clip, dim=+1).mean()"): ROWS,
    ("fvgpt.losses.x_mmrl_objective", "reg_text = 1 - F.cosine_similarity(text, text_clip, dim=-1).mean() → "
     "reg_text = 1 - F.cosine_similarity(text, text_clip, ).mean()"): ROWS,
    ("fvgpt.losses.x_mmrl_objective", "reg_text = 1 - F.cosine_similarity(text, text_clip, dim=-1).mean() → "
     "reg_text = 1 - F.cosine_similarity(text, text_clip, dim=+1).mean()"): ROWS,
    ("fvgpt.promptsrc.xǁPromptSRCǁteacher", "return nn.functional.normalize(feats.mean(0), dim=-1) → "
     "return nn.functional.normalize(feats.mean(0), )"): ROWS,
    ("fvgpt.promptsrc.xǁPromptSRCǁteacher", "return nn.functional.normalize(feats.mean(0), dim=-1) → "
     "return nn.functional.normalize(feats.mean(0), dim=+1)"): ROWS,
    ("fvgpt.promptsrc.xǁPromptSRCǁteacher", "feats = torch.stack([encoder(bb.tokenize(prompts(labels, t)), "
     "normalize=False) for t in TEACHER_TEMPLATES]) → feats = torch.stack([encoder(bb.tokenize(prompts(labels, t)), "
     "normalize=None) for t in TEACHER_TEMPLATES])"): "None and False are both false for TextEncoder.pool's "
                                                       "`if normalize`",
    ("fvgpt.mmrl.xǁMMRLǁteacher", "return model.encode_text(labels, learned=False, template=self.template) → "
     "return model.encode_text(labels, learned=None, template=self.template)"):
        "None and False are both false for encode_text's `if learned`",
    ("fvgpt.mmrl.x_text_features", 'grown = torch.full((length, length), float("-inf"), device=x.device, '
     'dtype=x.dtype).triu(1) → grown = torch.full((length, length), float("-INF"), device=x.device, '
     'dtype=x.dtype).triu(1)'): 'float() reads "-inf" and "-INF" alike',
    ("fvgpt.mmrl.x_text_features", 'grown = torch.full((length, length), float("-inf"), device=x.device, '
     'dtype=x.dtype).triu(1) → grown = torch.full((length, length), float("-inf"), device=None, '
     'dtype=x.dtype).triu(1)'): CPU,
    ("fvgpt.mmrl.x_text_features", 'grown = torch.full((length, length), float("-inf"), device=x.device, '
     'dtype=x.dtype).triu(1) → grown = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)'): CPU,
    ("fvgpt.mmrl.x_text_features", 'grown = torch.full((length, length), float("-inf"), device=x.device, '
     'dtype=x.dtype).triu(1) → grown = torch.full((length, length), float("-inf"), device=x.device, '
     'dtype=None).triu(1)'): FP32,
    ("fvgpt.mmrl.x_text_features", 'grown = torch.full((length, length), float("-inf"), device=x.device, '
     'dtype=x.dtype).triu(1) → grown = torch.full((length, length), float("-inf"), device=x.device, ).triu(1)'):
        FP32,
    ("fvgpt.mmrl.x_text_features", "rep = tokens[i - start].to(x.dtype).expand(x.shape[0], -1, -1) → "
     "rep = tokens[i - start].to(None).expand(x.shape[0], -1, -1)"): FP32,
    ("fvgpt.mmrl.xǁMMRLǁbranch", "rep = tokens[k].to(x.dtype).expand(batch, -1, -1) → "
     "rep = tokens[k].to(None).expand(batch, -1, -1)"): FP32,
    ("fvgpt.mmrl.xǁMMRLǁbranch", "f_r = x[:, 1:].mean(dim=1) @ proj_rep.to(x.dtype) → "
     "f_r = x[:, 1:].mean(dim=1) @ proj_rep.to(None)"): FP32,
    ("fvgpt.mmrl.xǁMMRLǁfrom_state", "with torch.random.fork_rng(devices=[]):  # the shapes only: loading draws "
     "nothing from the caller's RNG → with torch.random.fork_rng(devices=None):  # the shapes only: loading draws "
     "nothing from the caller's RNG"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁfrom_state", "learner.load_state_dict({k: v.to(backbone.device) for k, v in "
     "tensors.items()}) → learner.load_state_dict({k: v.to(None) for k, v in tensors.items()})"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁshaped", "dev = backbone.device → dev = None"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁshaped", "rep = torch.randn(cfg.rep_tokens, cfg.rep_dim, device=dev) * REP_STD → "
     "rep = torch.randn(cfg.rep_tokens, cfg.rep_dim, device=None) * REP_STD"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁshaped", "rep = torch.randn(cfg.rep_tokens, cfg.rep_dim, device=dev) * REP_STD → "
     "rep = torch.randn(cfg.rep_tokens, cfg.rep_dim, ) * REP_STD"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁshaped", "one_visual, one_text = nn.Linear(cfg.rep_dim, width, device=dev), "
     "nn.Linear(cfg.rep_dim, text_width, device=dev) → one_visual, one_text = nn.Linear(cfg.rep_dim, width, "
     "device=None), nn.Linear(cfg.rep_dim, text_width, device=dev)"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁshaped", "one_visual, one_text = nn.Linear(cfg.rep_dim, width, device=dev), "
     "nn.Linear(cfg.rep_dim, text_width, device=dev) → one_visual, one_text = nn.Linear(cfg.rep_dim, width, ), "
     "nn.Linear(cfg.rep_dim, text_width, device=dev)"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁshaped", "one_visual, one_text = nn.Linear(cfg.rep_dim, width, device=dev), "
     "nn.Linear(cfg.rep_dim, text_width, device=dev) → one_visual, one_text = nn.Linear(cfg.rep_dim, width, "
     "device=dev), nn.Linear(cfg.rep_dim, text_width, device=None)"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁshaped", "one_visual, one_text = nn.Linear(cfg.rep_dim, width, device=dev), "
     "nn.Linear(cfg.rep_dim, text_width, device=dev) → one_visual, one_text = nn.Linear(cfg.rep_dim, width, "
     "device=dev), nn.Linear(cfg.rep_dim, text_width, )"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁshaped", "proj_rep = width ** -0.5 * torch.randn(width, backbone.embed_dim, device=dev) → "
     "proj_rep = width ** -0.5 * torch.randn(width, backbone.embed_dim, device=None)"): CPU,
    ("fvgpt.mmrl.xǁMMRLǁshaped", "proj_rep = width ** -0.5 * torch.randn(width, backbone.embed_dim, device=dev) → "
     "proj_rep = width ** -0.5 * torch.randn(width, backbone.embed_dim, )"): CPU,
    ("fvgpt.promptsrc.xǁPromptSRCǁfrom_state", 'return cls(*(tensors[k].to(backbone.device) for k in ("ctx", '
     '"text_deep", "vision_ctx", "vision_deep"))) → return cls(*(tensors[k].to(None) for k in ("ctx", "text_deep", '
     '"vision_ctx", "vision_deep")))'): CPU,
    ("fvgpt.prompts.xǁPromptLearnerǁfrom_state", 'return cls(tensors["ctx"].to(backbone.device)) → '
     'return cls(tensors["ctx"].to(None))'): CPU,
    ("fvgpt.evaluate.x_eval_features", "def eval_features(model: FVGPTModel, index: DatasetIndex, batch_size: int = "
     "100, → def eval_features(model: FVGPTModel, index: DatasetIndex, batch_size: int = 101,"): BATCH,
    ("fvgpt.evaluate.x_eval_features", "progress: bool = True) -> EvalFeatures: → progress: bool = False) -> "
     "EvalFeatures:"): "a default every caller overrides: evaluate() and the benchmark pass `progress` explicitly, "
                       "and the bar is output only",
}


def undecorate(source: str) -> str:
    """`@decorator` + def name → def name … followed by `name = decorator(name)` in the same scope, for each single
    decorator of UNDECORATED."""
    lines = source.splitlines(keepends=True)
    defs = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and len(n.decorator_list) == 1
            and ast.unparse(n.decorator_list[0]) in UNDECORATED]
    for node in sorted(defs, key=lambda n: -n.lineno):
        decorator = node.decorator_list[0].lineno - 1
        indent = lines[decorator][:len(lines[decorator]) - len(lines[decorator].lstrip())]
        name = ast.unparse(node.decorator_list[0])
        lines.insert(node.end_lineno, f"{indent}{node.name} = {name}({node.name})\n")
        del lines[decorator]
    return "".join(lines)


def prepare() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    for part in ("fvgpt", "tests", "docs"):
        shutil.copytree(ROOT / part, WORK / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", WORK)
    for path in (WORK / "fvgpt").glob("*.py"):
        path.write_text(undecorate(path.read_text()))


def run(scope: list[str]) -> float:
    prepare()
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one core per mutant; fork-safe torch
    t0 = time.perf_counter()
    subprocess.run(["mutmut", "run", "--max-children", os.environ.get("MUTATION_WORKERS", "2"), *scope], cwd=WORK,
                   env=env, check=True)
    return time.perf_counter() - t0


def results(scope: list[str]) -> dict[str, int | None]:
    out = {}
    for meta in (WORK / "mutants" / "fvgpt").glob("*.py.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatch(name, pattern) for pattern in scope):
                out[name] = code
    return out


def mutated_line(name: str) -> str:
    """"original → mutated" from `mutmut show`, lines stripped (several changed lines joined with " / ")."""
    diff = subprocess.run(["mutmut", "show", name], cwd=WORK, capture_output=True, text=True).stdout
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return " → ".join(" / ".join(line[1:].strip() for line in changed if line[0] == sign) for sign in "-+")


def report(seconds: float | None, scope: list[str]) -> int:
    from mutmut.stats import status_by_exit_code

    by_status: dict[str, list[str]] = {}
    for name, code in sorted(results(scope).items()):
        by_status.setdefault(status_by_exit_code[code], []).append(name)
    if not by_status:
        print("no results: run `python -m tests.mutation.score --run` first")
        return 1
    killed = len(by_status.get("killed", [])) + len(by_status.get("timeout", []))
    equivalent, alive = [], []
    for name in by_status.get("survived", []) + by_status.get("no tests", []):
        key = (name.rsplit("__mutmut_", 1)[0], mutated_line(name))
        (equivalent if key in EQUIVALENT else alive).append((name, key))
    on_cpu = sum(EQUIVALENT[key] == CPU for _, key in equivalent)
    total = sum(len(v) for v in by_status.values())
    print(f"mutants in scope: {total}; " + ", ".join(f"{k}: {len(v)}" for k, v in sorted(by_status.items())))
    print(f"survivors judged equivalent (EQUIVALENT in tests/mutation/score.py): {len(equivalent)}, of which "
          f"{on_cpu} only on a CPU host")
    scored = total - len(equivalent)
    print(f"score: {killed} killed of {scored} non-equivalent = {100 * killed / max(1, scored):.1f} % "
          f"({100 * killed / max(1, scored + on_cpu):.1f} % if the CPU-only ones count as survivors)")
    if seconds is not None:
        print(f"mutmut run: {seconds / 60:.1f} min wall")
    for name, (_, line) in alive:
        print(f"  survived: {name}: {line}")
    return 0


def main(argv: list[str]) -> int:
    scope = [p for p in argv[argv.index("--only") + 1].split(",") if p] if "--only" in argv else SCOPE
    return report(run(scope) if "--run" in argv else None, scope)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
