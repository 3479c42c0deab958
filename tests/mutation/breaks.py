"""The deliberate one-line breaks of the method that issue 9 lists, each applied to a copy of fvgpt/ and run against
the method tests: every break must fail at least one test. `python -m tests.mutation.breaks [NAME ...]`.

The working tree is never modified: each break is written into a temporary copy of fvgpt/ (with tests/, docs/ and
pyproject.toml beside it, and the tests run from there, so that copy is the fvgpt they import), and an unbroken copy
is run first as the control, which must pass.
Prints a markdown table (docs/testing.md, "The breaks of issue 9").
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/test_method.py", "tests/test_method_wiring.py", "tests/test_method_directions.py",
         "tests/test_method_defaults.py", "tests/test_golden.py", "tests/test_method_backbones.py", "-m", "not slow"]

# name → (file, original text, broken text); each original occurs exactly once in its file
BREAKS: dict[str, tuple[str, str, str]] = {
    "E7 KL reversed (distillation)": (
        "losses.py", "r * kl_div(z_fg, z_fdc, tau) + (1 - r) * kl_div(z_full, z_fdc, tau)",
        "r * kl_div(z_fdc, z_fg, tau) + (1 - r) * kl_div(z_fdc, z_full, tau)"),
    "E7 KL term dropped (distillation)": (
        "losses.py", "r * kl_div(z_fg, z_fdc, tau) + (1 - r) * kl_div(z_full, z_fdc, tau)",
        "r * kl_div(z_fg, z_fdc, tau)"),
    "E12 KL reversed (Prior Calibration)": ("losses.py", "kl_div(z_clip, z_pc, tau)", "kl_div(z_pc, z_clip, tau)"),
    "E12 KL term dropped (Prior Calibration)": (
        "losses.py", "return loss + kl_div(z_clip, z_pc, tau).mean() if use_kl else loss", "return loss"),
    "E13 KL reversed (D_fg)": ("metrics.py", "return kl_div(z_full, z_fg, tau)", "return kl_div(z_fg, z_full, tau)"),
    "E13 KL dropped (D_fg)": ("metrics.py", "return kl_div(z_full, z_fg, tau)", "return 0 * kl_div(z_full, z_fg, tau)"),
    "λ_d 10 → 1": ("config.py", 'lambda_d: float = option(10.0,', 'lambda_d: float = option(1.0,'),
    "τ = 1 everywhere": ("config.py", 'tau: float = option(2.0,', 'tau: float = option(1.0,'),
    "BRG inputs reordered": ("plugin.py", "torch.stack([h_full, h_clip, prob_cosine(p_full, p_clip)], dim=-1)",
                             "torch.stack([h_clip, h_full, prob_cosine(p_full, p_clip)], dim=-1)"),
    "CE(z_FDC) removed from L_base": (
        "losses.py", "l_base = F.cross_entropy(heads.z_fdc, labels) + cfg.lambda_rg * l_frg",
        "l_base = cfg.lambda_rg * l_frg"),
    "z_FDC on the foreground view": (
        "model.py", "return plugin_objective(self.plugin, self.heads(f, tables), z_fg,",
        "return plugin_objective(self.plugin, __import__('dataclasses').replace(self.heads(f, tables), "
        "z_fdc=self.base_head(f_fg, self.plugin.adapt_text(tables.learned))), z_fg,"),
    "FRG area input forced to 1": ("model.py", "z_fg, masks.mean(dim=(1, 2, 3)), has_mask",
                                   "z_fg, torch.ones_like(masks.mean(dim=(1, 2, 3))), has_mask"),
    "no stage-2 augmentation": ("train.py", "_base_loader(model, index, True, cfg.plugin_batch)",
                                "_base_loader(model, index, False, cfg.plugin_batch)"),
    "evaluation's new head without Prior Calibration": ("evaluate.py", 'rows["fvgpt"] = ("z_fdc", "z_pc")',
                                                        'rows["fvgpt"] = ("z_fdc", "z_full")'),
    "D_fg on the wrong head": (
        "evaluate.py", "z_full, z_fg = getattr(on_base, base_head)[masked], getattr(on_base_fg, base_head)",
        'z_full, z_fg = getattr(on_base, "z_full")[masked], getattr(on_base_fg, "z_full")'),
    "default background fill changed (config)": ("config.py", 'fg_fill: str = option("mean",',
                                                 'fg_fill: str = option("black",'),
    "default background fill changed (foreground_view)": ("data.py", 'fill: str = "mean") -> torch.Tensor:',
                                                          'fill: str = "black") -> torch.Tensor:'),
    # PromptSRC and MMRL (issue 22)
    "PromptSRC L_SCL logits KL reversed": (
        "losses.py", "F.kl_div(F.log_softmax(z, dim=-1), F.log_softmax(z_clip, dim=-1),",
        "F.kl_div(F.log_softmax(z_clip, dim=-1), F.log_softmax(z, dim=-1),"),
    "PromptSRC GPA ignored (last epoch's prompts)": (
        "train.py", "        trainable.load_state_dict(average.result())\n", "        pass\n"),
    "PromptSRC visual prompts after ln_pre": (
        "promptsrc.py", "x = visual.ln_pre(torch.cat([x, self.vision_ctx.to(x.dtype).expand(x.shape[0], -1, -1)], "
                        "dim=1))",
        "x = torch.cat([visual.ln_pre(x), self.vision_ctx.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)"),
    "MMRL α and 1 − α swapped": ("losses.py", "loss = alpha * ce_class + (1 - alpha) * ce_rep",
                                  "loss = (1 - alpha) * ce_class + alpha * ce_rep"),
    "MMRL new head on the fused logits": ("mmrl.py", '"new": (1.0, 0.0)}', '"new": (alpha, 1.0 - alpha)}'),
    "MMRL text EOT not moved": ("mmrl.py", "return encoder.pool(x, token_ids, shift=n)",
                                "return encoder.pool(x, token_ids)"),
    "x_fg through CLIP's tower (PromptSRC, MMRL)": (
        "model.py", "f, tuned_fg = self.encode_image(pixels), self.encode_tuned(x_fg)",
        "f, tuned_fg = self.encode_image(pixels), self.tower(x_fg).unsqueeze(1)"),
}


def run_tests(copy: Path) -> tuple[int, list[str], float]:
    check = subprocess.run([sys.executable, "-c", "import fvgpt; print(fvgpt.__file__)"], capture_output=True,
                           text=True, cwd=copy)
    assert check.stdout.strip() == str(copy / "fvgpt" / "__init__.py"), check.stdout + check.stderr
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                          capture_output=True, text=True, cwd=copy)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    return proc.returncode, failed, time.perf_counter() - t0


def main(names: list[str]) -> int:
    chosen = names or list(BREAKS)
    print("| break | file | tests that fail |\n|---|---|---|")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["control (no break)", *chosen]:
            copy = Path(tmp) / f"c{len(os.listdir(tmp))}"
            for part in ("fvgpt", "tests", "docs"):
                shutil.copytree(ROOT / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(ROOT / "pyproject.toml", copy)
            file = "-"
            if name in BREAKS:
                file, old, new = BREAKS[name]
                source = (copy / "fvgpt" / file).read_text()
                assert source.count(old) == 1, f"{name}: {old!r} is not once in fvgpt/{file}"
                (copy / "fvgpt" / file).write_text(source.replace(old, new))
            rc, failed, seconds = run_tests(copy)
            caught = rc != 0 and failed
            ok &= bool(caught) if name in BREAKS else rc == 0
            shown = ", ".join(f.split("::")[-1] for f in failed[:4]) + (f" (+{len(failed) - 4})" if len(failed) > 4
                                                                        else "")
            print(f"| {name} | fvgpt/{file} | {len(failed)}: {shown or ('none, rc ' + str(rc))} |"
                  if name in BREAKS else f"| {name} | - | {'passes' if rc == 0 else 'FAILS'} ({seconds:.0f} s) |",
                  flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
