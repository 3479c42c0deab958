"""Class names and prompt text: the one place that turns a label into the words the text tower reads.

Torch-free: the bundle runtime and the server use it too (docs/architecture.md, "torch-free core").
"""
from __future__ import annotations

ZERO_SHOT_TEMPLATE = "a photo of a {}."  # the hand-crafted prompt of zero-shot CLIP (docs/method.md, defaults)
# MMRL's hand-written prompt per CoOp dataset (its trainers/mmrl.py, CUSTOM_TEMPLATES), keyed by CoOp's class name
MMRL_TEMPLATES = {"OxfordPets": "a photo of a {}, a type of pet.",
                  "OxfordFlowers": "a photo of a {}, a type of flower.",
                  "FGVCAircraft": "a photo of a {}, a type of aircraft.", "DescribableTextures": "{} texture.",
                  "EuroSAT": "a centered satellite photo of {}.", "StanfordCars": "a photo of a {}.",
                  "Food101": "a photo of {}, a type of food.", "SUN397": "a photo of a {}.",
                  "Caltech101": "a photo of a {}.", "UCF101": "a photo of a person doing {}.",
                  "ImageNet": "a photo of a {}."}
CONTEXT_PLACEHOLDER = "X"  # one token whose embedding a learned context vector replaces


def display_name(label: str) -> str:
    """How a class name is written in a prompt: underscores as spaces, whitespace collapsed ("golden_retriever" →
    "golden retriever"). Dataset folders use underscores; people type spaces; both name the same class."""
    return " ".join(label.replace("_", " ").split())


def learned_template(n_ctx: int) -> str:
    """"X X X X {}.": CoOp's prompt with the class token at the end; the n_ctx placeholders are replaced by the
    learned context vectors inside the text tower."""
    return " ".join([CONTEXT_PLACEHOLDER] * n_ctx) + " {}."


def prompts(labels: list[str], template: str) -> list[str]:
    return [template.format(display_name(label)) for label in labels]
