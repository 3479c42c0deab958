"""The evaluation preprocessing of a backbone, as open_clip defines it: one typed record, written into run dirs and
bundles and read back by the torch-free runtime (docs/bundle-format.md, "preprocess").

Two implementations consume it: torchvision transforms for training and evaluation (fvgpt.data), NumPy + PIL for
serving (runtime.preprocess); tests/test_preprocess.py pins both to open_clip's own transform.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import FVGPTError

INTERPOLATIONS = ("bicubic", "bilinear")
RESIZE_MODES = ("shortest", "squash")  # shortest: resize the short side, centre crop; squash: resize to a square


class PreprocessError(FVGPTError):
    pass


@dataclass(frozen=True)
class Preprocess:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise PreprocessError(f"preprocess.interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.resize_mode not in RESIZE_MODES:
            raise PreprocessError(f"preprocess.resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.size < 1 or len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise PreprocessError(f"preprocess: size must be ≥ 1 and mean/std three values with std > 0, got {self}")

    def to_dict(self) -> dict:
        return asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        try:
            return cls(size=int(d["size"]), mean=tuple(float(v) for v in d["mean"]),
                       std=tuple(float(v) for v in d["std"]), interpolation=str(d["interpolation"]),
                       resize_mode=str(d["resize_mode"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PreprocessError(f"preprocess block is incomplete or malformed ({exc!r}): {d!r}") from None
