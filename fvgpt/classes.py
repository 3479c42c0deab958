"""The class list of a run or bundle and its base/new split: one object instead of flags passed around.

Torch-free (the bundle runtime routes label sets with it). The paper's protocol: classes sorted by label, the first
⌈n/2⌉ are base (trained on), the rest new (docs/method.md, "Protocol").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from .errors import FVGPTError
from .labels import display_name


class ClassSplitError(FVGPTError):
    pass


@dataclass(frozen=True)
class ClassSplit:
    names: tuple[str, ...]
    base: tuple[bool, ...]  # per class, in label order

    def __post_init__(self) -> None:
        if len(self.names) != len(self.base):
            raise ClassSplitError(f"{len(self.names)} class names but {len(self.base)} base flags")
        if len(set(self.names)) != len(self.names):
            dupes = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ClassSplitError(f"class names repeat: {dupes}")

    @classmethod
    def paper(cls, names: list[str], base_names: list[str] | None = None) -> ClassSplit:
        """The first ⌈n/2⌉ classes are base, unless `base_names` lists them explicitly."""
        if base_names is None:
            if len(names) < 2:
                raise ClassSplitError(f"need at least two classes to form base and new splits, found "
                                      f"{len(names)}: {names}")
            n_base = math.ceil(len(names) / 2)
            return cls(tuple(names), tuple(i < n_base for i in range(len(names))))
        unknown = [c for c in base_names if c not in names]
        if unknown or not base_names:
            raise ClassSplitError(f"--base-classes must name at least one of the classes {names}"
                                  + (f"; unknown: {unknown}" if unknown else ""))
        chosen = set(base_names)
        return cls(tuple(names), tuple(c in chosen for c in names))

    @classmethod
    def from_records(cls, records: list[dict]) -> ClassSplit:
        """From [{"name": ..., "base": ...}] as run dirs and bundle manifests store it."""
        return cls(tuple(str(r["name"]) for r in records), tuple(bool(r["base"]) for r in records))

    def records(self) -> list[dict]:
        return [{"name": n, "base": b} for n, b in zip(self.names, self.base)]

    @cached_property
    def base_ids(self) -> list[int]:
        return [i for i, b in enumerate(self.base) if b]

    @cached_property
    def new_ids(self) -> list[int]:
        return [i for i, b in enumerate(self.base) if not b]

    @property
    def base_names(self) -> list[str]:
        return [self.names[i] for i in self.base_ids]

    @property
    def new_names(self) -> list[str]:
        return [self.names[i] for i in self.new_ids]

    @cached_property
    def position(self) -> list[int]:
        """For each class label, its position within its own split (base or new): label → column of that head."""
        pos = [0] * len(self.names)
        for ids in (self.base_ids, self.new_ids):
            for p, i in enumerate(ids):
                pos[i] = p
        return pos

    @cached_property
    def _lookup(self) -> dict[str, int]:
        # exact names win over display names ("golden_retriever" and "golden retriever" both find the class)
        return {display_name(n): i for i, n in enumerate(self.names)} | {n: i for i, n in enumerate(self.names)}

    def find(self, label: str) -> int | None:
        """The class a label names, by exact or display name; None for a label outside the list."""
        return self._lookup.get(label)

    def head_for(self, labels: list[str] | None) -> str:
        """Routing (docs/method.md, "Inference"): a label set made only of base classes goes to the base head (FDC);
        any other set (new or unknown labels, or all classes when some are new) to the new head (Prior
        Calibration over exactly those labels)."""
        chosen = self.names if labels is None else labels
        ids = [self.find(label) for label in chosen]
        return "base" if all(i is not None and self.base[i] for i in ids) else "new"
