"""A generated image–caption world with exact foreground masks (docs/world.md).

Objects are a shape × a colour × a surface pattern ("striped red star"), drawn at a random position, size and tilt on
one of several structured scenes (grass, sand, water, snow, brick, sky, forest, road), each with its own textures and
colours. Captions describe the object and the scene in varied words, so a CLIP pretrained on them (fvgpt.world_clip)
knows both. Few-shot tasks follow the paper's base-to-new protocol, with the one knob the method exists for: the
training images' scenes correlate with their class at a chosen rate, while test scenes never do.

Everything is NumPy + PIL and deterministic: an image is a pure function of its seeds, and the mask is the exact set
of pixels the object was drawn on (the composite equals the scene outside it, and the object inside it).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

from .config import option
from .datasets import MASK_DIR
from .errors import FVGPTError
from .labels import display_name

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35), "orange": (240, 125, 20), "yellow": (240, 210, 35), "green": (40, 165, 55),
    "blue": (35, 75, 215), "purple": (135, 45, 175), "pink": (240, 125, 185), "white": (240, 240, 240)}
PATTERNS = ("solid", "striped", "dotted", "checkered")
SCENES = ("grass", "sand", "water", "snow", "brick", "sky", "forest", "road")
BACKDROP = "plain"  # a plain studio backdrop: pretraining only (the foreground view looks like it), never in tasks

SCENE_WORDS: dict[str, tuple[str, ...]] = {
    "grass": ("grass", "a lawn", "a grassy field", "green grass", "a meadow"),
    "sand": ("sand", "a beach", "the desert", "sand dunes", "a sandy beach"),
    "water": ("water", "the sea", "a lake", "waves", "the ocean"),
    "snow": ("snow", "a snowfield", "fresh snow", "a snowy field", "white snow"),
    "brick": ("a brick wall", "bricks", "a red brick wall", "a wall of bricks", "brickwork"),
    "sky": ("the sky", "a blue sky", "clouds", "a cloudy sky", "the sky with clouds"),
    "forest": ("a forest", "trees", "the woods", "a dark forest", "tree trunks"),
    "road": ("a road", "asphalt", "the street", "a road with lane markings", "tarmac"),
    BACKDROP: ("a plain background", "a plain backdrop", "a blank background", "an empty background"),
}
PATTERN_NOUNS = {"solid": "a single colour", "striped": "stripes", "dotted": "dots", "checkered": "a checkered pattern"}


class WorldError(FVGPTError):
    pass


@dataclass(frozen=True)
class ObjectKind:
    shape: str
    colour: str
    pattern: str

    @property
    def name(self) -> str:
        """The class name: "striped red star" (the folder is striped_red_star)."""
        return f"{self.pattern} {self.colour} {self.shape}"

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "_")


ALL_KINDS = tuple(ObjectKind(s, c, p) for s, c, p in product(SHAPES, COLOURS, PATTERNS))


@dataclass(frozen=True)
class Placement:
    """Where and how the object is drawn, in pixels of a size × size image."""

    cx: float
    cy: float
    radius: float
    tilt: float  # radians
    pattern_angle: float
    pattern_period: float  # in units of the radius
    shade: float  # brightness of this instance of the colour


def seeded_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def sample_placement(rng: np.random.Generator, size: int) -> Placement:
    radius = rng.uniform(0.2, 0.36) * size  # diameter 40–72 % of the side: foreground 12–40 % of the area
    cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
    return Placement(cx, cy, radius, rng.uniform(-0.35, 0.35), rng.uniform(0, math.pi), rng.uniform(0.55, 0.8),
                     rng.uniform(0.85, 1.1))


# ---- objects ---------------------------------------------------------------------------------------------------

def _polygon(u: np.ndarray, v: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test of every (u, v)."""
    inside = np.zeros(u.shape, bool)
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        crosses = (y0 > v) != (y1 > v)
        x_at = (x1 - x0) * (v - y0) / (y1 - y0 if y1 != y0 else 1e-12) + x0
        inside ^= crosses & (u < x_at)
    return inside


_STAR = [(math.sin(k * math.pi / 5) * (1.0 if k % 2 == 0 else 0.45), -math.cos(k * math.pi / 5)
          * (1.0 if k % 2 == 0 else 0.45)) for k in range(10)]


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The shape in object coordinates (unit radius, v pointing down)."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.8
    if shape == "triangle":
        return _polygon(u, v, [(0.0, -1.0), (0.95, 0.75), (-0.95, 0.75)])
    if shape == "diamond":
        return abs(u) / 0.8 + abs(v) <= 1
    if shape == "star":
        return _polygon(u, v, _STAR)
    if shape == "cross":
        return ((abs(u) <= 0.32) & (abs(v) <= 0.95)) | ((abs(v) <= 0.32) & (abs(u) <= 0.95))
    if shape == "ring":
        return (u * u + v * v <= 1) & (u * u + v * v >= 0.3)
    if shape == "heart":
        x, y = u * 1.2, -v * 1.2 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")


def _second_colour(rgb: np.ndarray) -> np.ndarray:
    """The pattern's other colour: a dark shade of light colours, a pale tint of dark ones."""
    return rgb * 0.3 if rgb @ (0.299, 0.587, 0.114) > 150 else rgb * 0.35 + 255 * 0.65


def object_layer(kind: ObjectKind, at: Placement, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(RGB float image of the object's surface, exact boolean mask), both size × size."""
    y, x = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    dx, dy = (x - at.cx) / at.radius, (y - at.cy) / at.radius
    cos, sin = math.cos(at.tilt), math.sin(at.tilt)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    mask = shape_mask(kind.shape, u, v)
    base = np.clip(np.array(COLOURS[kind.colour], float) * at.shade + rng.normal(0, 8, 3), 0, 255)
    other = _second_colour(base)
    a = at.pattern_angle
    along, across = math.cos(a) * u + math.sin(a) * v, -math.sin(a) * u + math.cos(a) * v
    period = at.pattern_period
    if kind.pattern == "solid":
        second = np.zeros(mask.shape, bool)
    elif kind.pattern == "striped":
        second = np.floor(along / (period / 2)) % 2 == 1
    elif kind.pattern == "checkered":
        second = (np.floor(along / (period / 1.6)) + np.floor(across / (period / 1.6))) % 2 == 1
    elif kind.pattern == "dotted":
        cu, cv = (np.mod(t / period, 1) - 0.5 for t in (along, across))
        second = cu * cu + cv * cv <= 0.22 ** 2
    else:
        raise ValueError(f"unknown pattern {kind.pattern!r} (one of {', '.join(PATTERNS)})")
    surface = np.where(second[..., None], other, base)
    light = 1 + 0.12 * (-0.6 * u - 0.8 * v)  # soft light from the top left
    surface = surface * light[..., None] + rng.normal(0, 4, (size, size, 1))
    return surface, mask


# ---- scenes ----------------------------------------------------------------------------------------------------

def _smooth(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Value noise in [0, 1]: a (rows, cols) grid of uniform values, bicubically upsampled to size × size."""
    grid = rng.random(cells).astype(np.float32)
    up = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float64)
    return np.clip(up, 0, 1)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], spread: float) -> np.ndarray:
    return np.array(rgb, float) + rng.uniform(-spread, spread, 3)


def scene_layer(scene: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGB float image of a scene, size × size; every call with the same rng state draws the same scene."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    fine = rng.normal(0, 1, (size, size))
    if scene == "grass":
        blades = _smooth(rng, size, (3, size // 2))
        patches = _smooth(rng, size, (4, 4))
        base = _jitter(rng, (60, 140, 45), 20)
        img = base * (0.55 + 0.5 * blades[..., None] + 0.25 * patches[..., None]) + 8 * fine[..., None]
    elif scene == "sand":
        a = rng.uniform(0, math.pi)
        ripples = np.sin(2 * math.pi * rng.uniform(5, 9) * (x * math.cos(a) + y * math.sin(a))
                         + 3 * _smooth(rng, size, (3, 3)))
        img = _jitter(rng, (215, 185, 125), 15) * (1 + 0.07 * ripples[..., None]) + 7 * fine[..., None]
    elif scene == "water":
        waves = np.sin(2 * math.pi * (rng.uniform(6, 11) * y + 0.3 * np.sin(2 * math.pi * rng.uniform(1, 3) * x
                                                                                + rng.uniform(0, 6))))
        img = _jitter(rng, (35, 95, 165), 20) * (1 + 0.18 * waves[..., None]) + 5 * fine[..., None]
        img = np.where((waves > 0.93)[..., None], img * 0.5 + 120, img)  # glints on the crests
    elif scene == "snow":
        drifts = _smooth(rng, size, (3, 3))
        img = _jitter(rng, (228, 232, 242), 8) - 28 * drifts[..., None] * np.array([1.0, 0.8, 0.3]) + 3 * fine[
            ..., None]
        img = np.where((rng.random((size, size)) > 0.985)[..., None], 255.0, img)  # sparkles
    elif scene == "brick":
        rows = rng.uniform(5.5, 8.5)
        height = size / rows
        row = np.floor(y * size / height)
        col = np.floor((x * size + (row % 2) * height) / (2 * height))
        mortar = (np.mod(y * size, height) < 1.2) | (np.mod(x * size + (row % 2) * height, 2 * height) < 1.2)
        brick_id = (row * 131 + col * 17) % 64
        shades = rng.uniform(0.8, 1.15, 64)[brick_id.astype(int)]
        img = _jitter(rng, (165, 65, 45), 15) * shades[..., None] + 6 * fine[..., None]
        img = np.where(mortar[..., None], _jitter(rng, (195, 190, 180), 10), img)
    elif scene == "sky":
        top, bottom = _jitter(rng, (65, 125, 215), 15), _jitter(rng, (170, 205, 240), 10)
        img = top + (bottom - top) * y[..., None]
        clouds = np.clip((_smooth(rng, size, (4, 5)) - rng.uniform(0.45, 0.6)) * 4, 0, 1)[..., None]
        img = img * (1 - clouds) + 245 * clouds + 2 * fine[..., None]
    elif scene == "forest":
        canopy = _smooth(rng, size, (6, 6))
        img = _jitter(rng, (30, 80, 35), 10) * (0.6 + 0.8 * canopy[..., None]) + 6 * fine[..., None]
        for _ in range(rng.integers(3, 6)):
            centre, half = rng.uniform(0, 1), rng.uniform(0.02, 0.05)
            img = np.where((abs(x - centre) < half)[..., None], _jitter(rng, (85, 58, 35), 12), img)
    elif scene == "road":
        img = np.full((size, size, 3), rng.uniform(65, 100)) + 10 * fine[..., None]
        a, offset = rng.uniform(-0.4, 0.4), rng.uniform(0.3, 0.7)
        lateral = (x - 0.5) * math.cos(a) - (y - 0.5) * math.sin(a) + 0.5 - offset
        along = (x - 0.5) * math.sin(a) + (y - 0.5) * math.cos(a)
        line = (abs(lateral) < 0.03) & (np.mod(along * 4 + rng.uniform(0, 1), 1) < 0.6)
        paint = (235, 200, 40) if rng.random() < 0.5 else (235, 235, 230)
        img = np.where(line[..., None], _jitter(rng, paint, 10), img)
    elif scene == BACKDROP:
        img = _jitter(rng, (128, 128, 128), 90) * (1 - 0.15 * ((x - 0.5) ** 2 + (y - 0.5) ** 2))[..., None]
    else:
        raise ValueError(f"unknown scene {scene!r} (one of {', '.join(SCENES + (BACKDROP,))})")
    return img


def distractor_placement(rng: np.random.Generator, size: int, under: Placement) -> Placement:
    """A smaller object (radius 14–20 % of the side) fully inside the image, its centre outside the circle of radius
    `under.radius` around the labelled object's centre (so that at least part of it shows beside the object);
    after 100 draws without such a centre, the last draw is kept."""
    radius = rng.uniform(0.14, 0.2) * size
    for _ in range(100):
        cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
        if math.hypot(cx - under.cx, cy - under.cy) >= under.radius:
            break
    return Placement(cx, cy, radius, rng.uniform(-0.35, 0.35), rng.uniform(0, math.pi), rng.uniform(0.55, 0.8),
                     rng.uniform(0.85, 1.1))


def _draw(kind: ObjectKind | None, scene: str, size: int, seed: tuple[int, ...],
          distractor: ObjectKind | None = None) -> tuple[np.ndarray, np.ndarray, Placement | None]:
    background = scene_layer(scene, size, seeded_rng(*seed, 1))
    if kind is None:
        return np.clip(background, 0, 255).astype(np.uint8), np.zeros((size, size), bool), None
    obj_rng = seeded_rng(*seed, 2)
    at = sample_placement(obj_rng, size)
    surface, mask = object_layer(kind, at, size, obj_rng)
    if distractor is not None:  # drawn first, so the labelled object covers it: it shows only outside the mask
        d_rng = seeded_rng(*seed, 3)
        d_surface, d_mask = object_layer(distractor, distractor_placement(d_rng, size, at), size, d_rng)
        background = np.where(d_mask[..., None], d_surface, background)
    return np.clip(np.where(mask[..., None], surface, background), 0, 255).astype(np.uint8), mask, at


def render(kind: ObjectKind | None, scene: str, size: int, seed: tuple[int, ...],
           distractor: ObjectKind | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 H×W×3) and its exact mask (bool H×W, empty without an object), a pure function of its
    arguments. The scene, the object and the distractor (an unlabelled object of another kind under the labelled
    one, outside its mask) draw from separate streams, so the same seed gives the same scene with or without the
    objects, and the same object, with the same mask, on any scene and with or without a distractor."""
    image, mask, _ = _draw(kind, scene, size, seed, distractor)
    return image, mask


# ---- captions --------------------------------------------------------------------------------------------------

def _object_phrase(kind: ObjectKind, rng: np.random.Generator) -> str:
    """Varied ways of naming an object, some leaving out an attribute (as alt-text does)."""
    s, c, p = kind.shape, kind.colour, kind.pattern
    options = [f"{p} {c} {s}", f"{p} {c} {s}", f"{c} {p} {s}", f"{c} {s} with {PATTERN_NOUNS[p]}",
               f"{s} that is {c} and {p}", f"{c} {s}", f"{p} {s}"]
    return options[rng.integers(len(options))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(kind: ObjectKind | None, scene: str, at: Placement | None, size: int, rng: np.random.Generator) -> str:
    """A caption naming the object, the scene, or both, in one of many wordings."""
    where = SCENE_WORDS[scene][rng.integers(len(SCENE_WORDS[scene]))]
    if kind is None:
        return [f"a photo of {where}.", f"{where}.", f"an empty view of {where}.", f"nothing but {where}."][
            rng.integers(4)]
    obj = _article(_object_phrase(kind, rng))
    size_word = ""
    if at is not None:
        size_word = "small " if at.radius < 0.24 * size else "large " if at.radius > 0.32 * size else ""
    sized = _article(size_word + obj.split(" ", 1)[1]) if size_word else obj
    templates = [f"a photo of {obj}.", f"{obj} on {where}.", f"a photo of {sized} on {where}.",
                 f"{where} with {obj}.", f"{sized} in front of {where}.", f"{obj} against {where}.",
                 f"there is {obj} on {where}.", f"a picture of {where}, with {obj} in it.", f"{sized}.",
                 f"{obj}, seen on {where}.", f"a photo of {where}.", f"close-up of {obj}."]
    return templates[rng.integers(len(templates))]


def sample_pair(rng: np.random.Generator, size: int, seed: tuple[int, ...],
                scenes: tuple[str, ...] = SCENES + (BACKDROP,)) -> tuple[np.ndarray, str]:
    """One pretraining (image, caption): any object kind (5 % none) on one of `scenes` (default: any scene or the
    plain backdrop)."""
    scene = scenes[rng.integers(len(scenes))]
    kind = None if rng.random() < 0.05 else ALL_KINDS[rng.integers(len(ALL_KINDS))]
    image, _, at = _draw(kind, scene, size, seed)
    return image, caption(kind, scene, at, size, rng)


# ---- few-shot tasks --------------------------------------------------------------------------------------------

# how base and new classes differ: "random" kinds, or disjoint values of one attribute (base classes take half of
# its values, in the world seed's order; new classes the rest: each side holds half of all kinds, so any class count
# fits)
SPLIT_ATTRIBUTES = {"colour": tuple(COLOURS), "pattern": PATTERNS}
SPLITS = ("random", *SPLIT_ATTRIBUTES)


@dataclass(frozen=True)
class TaskSpec:
    """A base-to-new few-shot task in the world. The test set depends only on (world_seed, classes, test_images,
    image_size); correlation, shots and draw change only the training images."""

    world_seed: int = option(0, "picks the classes, the scene each favours, and the test images", "task")
    classes: int = option(10, "object classes; the first half (in the world's order) are base, the rest new", "task")
    correlation: float = option(0.9, "fraction of each class's training images shown on the scene it favours; the "
                                    "rest on a random scene (0: scenes independent of the class)", "task")
    shots: int = option(16, "training images per class (K)", "task")
    test_images: int = option(1000, "test images per split (base, new), on balanced scenes: never correlated",
                              "task")
    image_size: int = option(64, "image side in pixels", "task")
    draw: int = option(1, "which draw of the K-shot training images (the benchmark's seed)", "task")
    split: str = option("random", "how base and new classes differ: random kinds (random), or disjoint values of "
                                  "one attribute, base classes taking half of its values and new classes the rest "
                                  f"({', '.join(SPLITS[1:])})", "task", SPLITS)
    distractors: float = option(1.0, "fraction of images (training and test) with a distractor: a smaller object of "
                                     "a kind that is no class of the task, under the labelled object, outside its "
                                     "mask (0: world v1's single objects)", "task")
    light: float = option(0.0, "warmth of the light the task's images are taken in: a colour cast over the whole "
                               "image that pretraining never showed (0: pretraining's white light; 1: green × 0.8, "
                               "blue × 0.55)", "task")

    def __post_init__(self) -> None:
        problems = []
        if self.split not in SPLITS:
            problems.append(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if not 0 <= self.distractors <= 1:
            problems.append(f"distractors must be in [0, 1], not {self.distractors}")
        if not 0 <= self.light <= 1:
            problems.append(f"light must be in [0, 1], not {self.light}")
        if not 2 <= self.classes <= len(ALL_KINDS):
            problems.append(f"classes must be in [2, {len(ALL_KINDS)}], not {self.classes}")
        if not 0 <= self.correlation <= 1:
            problems.append(f"correlation must be in [0, 1], not {self.correlation}")
        if self.shots < 1 or self.test_images < 1:
            problems.append(f"shots and test_images must be at least 1, not {self.shots}, {self.test_images}")
        if self.image_size < 16:
            problems.append(f"image_size must be at least 16, not {self.image_size}")
        if problems:
            raise WorldError("; ".join(problems))


def add_options(parser: argparse.ArgumentParser, spec_class, skip: tuple[str, ...] = ()) -> None:
    """One option per field of a dataclass made with fvgpt.config.option (--world-seed, --classes, ...), help and
    default from the field."""
    for f in fields(spec_class):
        if f.name not in skip:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                                choices=f.metadata.get("choices"), help=f"{f.metadata['help']} (default: {f.default})")


def from_args(spec_class, args: argparse.Namespace, **overrides):
    """The dataclass from the options add_options made (and `overrides`)."""
    given = {f.name: getattr(args, f.name) for f in fields(spec_class) if hasattr(args, f.name)}
    return spec_class(**(given | overrides))


@dataclass(frozen=True)
class TaskClass:
    kind: ObjectKind
    base: bool
    scene: str  # the scene its training images favour


def task_classes(world_seed: int, n: int, split: str = "random") -> list[TaskClass]:
    """n distinct object kinds in a seeded order; the first ⌈n/2⌉ are base. Each class favours one scene, distinct
    for as many classes as there are scenes (so the base classes' scenes tell them apart). With an attribute split,
    the base kinds take their value of that attribute from a seeded half of its values, the new kinds from the
    other half."""
    rng = seeded_rng(world_seed, 0)
    order = [ALL_KINDS[i] for i in rng.permutation(len(ALL_KINDS))]
    scenes = [SCENES[i] for i in rng.permutation(len(SCENES))]
    n_base = math.ceil(n / 2)
    if split == "random":
        kinds = order[:n]
    else:
        values = SPLIT_ATTRIBUTES[split]
        base_values = {values[i] for i in seeded_rng(world_seed, 4).permutation(len(values))[:len(values) // 2]}
        on_base_side = [getattr(k, split) in base_values for k in order]
        kinds = ([k for k, b in zip(order, on_base_side) if b][:n_base]
                 + [k for k, b in zip(order, on_base_side) if not b][:n - n_base])
    return [TaskClass(k, i < n_base, scenes[i % len(scenes)]) for i, k in enumerate(kinds)]


def distractor_kinds(classes: list[TaskClass]) -> list[ObjectKind]:
    """The kinds a distractor may be: every kind that is no class of the task."""
    taken = {c.kind for c in classes}
    return [k for k in ALL_KINDS if k not in taken]


def distractors_for(spec: TaskSpec, pool: list[ObjectKind], count: int,
                    rng: np.random.Generator) -> list[ObjectKind | None]:
    """For each of `count` images: a distractor kind drawn from `pool` with probability spec.distractors, else None."""
    shown = rng.random(count) < spec.distractors
    picks = rng.integers(len(pool), size=count)
    return [pool[p] if s else None for s, p in zip(shown, picks)]


def training_scenes(spec: TaskSpec, cls: TaskClass, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """(scene, correlated) for the class's K training images: round(ρ·K) of them on the class's scene, the rest on
    a uniformly random scene (which may be the class's scene too: at ρ = 0 scenes are independent of the class)."""
    n_corr = round(spec.correlation * spec.shots)
    drawn = [(cls.scene, True)] * n_corr + [(SCENES[rng.integers(len(SCENES))], False)
                                            for _ in range(spec.shots - n_corr)]
    return [drawn[i] for i in rng.permutation(len(drawn))]


def balanced_scenes(count: int, rng: np.random.Generator) -> list[str]:
    """Balanced scenes: every scene count/|scenes| times (±1), in random order, so no class favours one."""
    cycle = [SCENES[i % len(SCENES)] for i in range(count)]
    start = rng.integers(len(SCENES))
    return [cycle[(i + start) % count] for i in rng.permutation(count)] if count else []


def warm_light(image: np.ndarray, light: float) -> np.ndarray:
    """The image under a warm light: green × (1 − 0.2·light), blue × (1 − 0.45·light), a tungsten-like cast."""
    if light == 0:
        return image
    cast = np.array([1.0, 1 - 0.2 * light, 1 - 0.45 * light])
    return np.clip(np.round(image * cast), 0, 255).astype(np.uint8)


def _write(root: Path, rel: Path, image: np.ndarray, mask: np.ndarray) -> None:
    for folder, arr in ((root, image), (root / MASK_DIR, np.repeat(mask[..., None] * 255, 3, axis=2))):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr.astype(np.uint8)).save(folder / rel)  # PNG: lossless, so masks stay exact


def make_task(root: str | Path, spec: TaskSpec, progress: bool = False) -> Path:
    """Write the task in the layout fvgpt.data reads: ROOT/{train,test}/<class>/<i>.png, masks (white on black) at
    ROOT/mask/{train,test}/<class>/<i>.png, and ROOT/task.json (the spec, the classes with their base flag and
    favoured scene, every image's scene). Returns ROOT."""
    from tqdm.auto import tqdm

    from .progress import on_terminal

    root = Path(root)
    if (root / "task.json").is_file():
        if json.loads((root / "task.json").read_text())["spec"] == asdict(spec):
            return root
        raise WorldError(f"{root} holds another task (other settings); choose another folder or remove it")
    classes = task_classes(spec.world_seed, spec.classes, spec.split)
    pool = distractor_kinds(classes)
    n_base = sum(c.base for c in classes)
    records = []
    bar = tqdm(total=spec.shots * len(classes) + 2 * spec.test_images, desc="world task",
               disable=not (progress and on_terminal()))  # a second or two: no lines in a log
    for split, label in ((1, "train"), (2, "test")):
        for ci, cls in enumerate(classes):
            if split == 1:  # training images move with the draw, test images never do
                rng = seeded_rng(spec.world_seed, 1, spec.draw, ci)
                scenes = training_scenes(spec, cls, rng)
            else:
                n_split = n_base if cls.base else len(classes) - n_base
                position = sum(c.base == cls.base for c in classes[:ci])
                count = spec.test_images // n_split + (position < spec.test_images % n_split)
                rng = seeded_rng(spec.world_seed, 2, ci)
                scenes = [(s, False) for s in balanced_scenes(count, rng)]
            draw = spec.draw if split == 1 else 0
            others = distractors_for(spec, pool, len(scenes), seeded_rng(spec.world_seed, 3, split, draw, ci))
            for i, ((scene, correlated), other) in enumerate(zip(scenes, others)):
                seed = (spec.world_seed, split, draw, ci, i)
                image, mask = render(cls.kind, scene, spec.image_size, seed, other)
                image = warm_light(image, spec.light)
                rel = Path(label) / cls.kind.folder / f"{i:04d}.png"
                _write(root, rel, image, mask)
                records.append({"path": str(rel), "class": cls.kind.name, "scene": scene, "correlated": correlated,
                                "distractor": other.name if other else None, "area": round(float(mask.mean()), 4)})
                bar.update()
    bar.close()
    doc = {"spec": asdict(spec),
           "classes": [{"name": c.kind.name, "folder": c.kind.folder, "base": c.base, "scene": c.scene}
                       for c in classes],
           "base_classes": [c.kind.folder for c in classes if c.base], "images": records}
    (root / "task.json").write_text(json.dumps(doc, indent=1) + "\n")
    return root


def base_classes(root: str | Path) -> list[str]:
    """The task's base classes (folder names), for TrainConfig.base_classes / `fvgpt train --base-classes`."""
    return json.loads((Path(root) / "task.json").read_text())["base_classes"]


def describe(root: str | Path) -> str:
    doc = json.loads((Path(root) / "task.json").read_text())
    s = doc["spec"]
    head = (f"world {s['world_seed']}: {s['classes']} classes split {s['split']}, {s['shots']} shots, correlation "
            f"{s['correlation']}, distractors {s['distractors']}, light {s['light']}, {s['image_size']} px, "
            f"draw {s['draw']}")
    lines = [head]
    for c in doc["classes"]:
        lines.append(f"  {'base' if c['base'] else 'new '}  {display_name(c['name']):<26} favours {c['scene']}")
    return "\n".join(lines)


# ---- the micro-CLIP: its training settings in the world and its pretraining settings (torch-free for the CLI) ----

WORLD_MODEL = "fvgpt-micro"


STAGE_STEPS = 1500  # optimiser steps per training stage, at least (the paper's median dataset gets about 2,000)


def epochs_for(steps: int, images: int, batch: int) -> int:
    """Whole epochs that give at least `steps` optimiser steps over `images` training images in batches of `batch`."""
    return max(1, math.ceil(steps / math.ceil(images / batch)))


def world_train_settings(spec: TaskSpec, steps: int = STAGE_STEPS, batch: int = 4) -> dict:
    """TrainConfig fields the demo and benchmarks.method set for the world (the rest are the paper's defaults):
    the micro-CLIP; random crops that keep at least half of the image, because the world's objects cover 12–40 %
    of it and the paper's 8 % crops (made for photos whose object fills the frame) would often cut the object out;
    and enough epochs for `steps` optimiser steps per stage at the paper's batch of 4, because the paper's 10 epochs
    of a 5-class task are only 200 steps."""
    epochs = epochs_for(steps, math.ceil(spec.classes / 2) * spec.shots, batch)
    return {"model": WORLD_MODEL, "crop_scale": 0.5, "prompt_epochs": epochs, "plugin_epochs": epochs}


@dataclass(frozen=True)
class PretrainConfig:
    """The defaults are the committed checkpoint's settings (fvgpt/weights/README.md)."""

    model: str = option(WORLD_MODEL, "open_clip model to train from random init", "pretrain")
    steps: int = option(1800, "optimiser steps", "pretrain")
    batch: int = option(64, "(image, caption) pairs per step, drawn afresh every step", "pretrain")
    lr: float = option(2e-3, "AdamW peak learning rate", "pretrain")
    warmup: float = option(0.05, "fraction of the steps with a linear warm-up (then cosine to 0)", "pretrain")
    weight_decay: float = option(0.1, "AdamW weight decay of the weight matrices", "pretrain")
    batch_scenes: int = option(2, "scenes per batch: the rest of a batch differs in the object (hard negatives)",
                               "pretrain")
    seed: int = option(0, "seeds the init and every drawn pair", "pretrain")
    threads: int = option(1, "torch threads: the ops of a micro model are too small to share, and one thread "
                             "gives the same bytes on any machine with this torch and CPU architecture", "pretrain")
    probe_every: int = option(200, "steps between zero-shot probes recorded along the way (0: only at the end)",
                              "pretrain")
