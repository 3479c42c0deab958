"""Progress output for training, evaluation and mask generation: a bar on a terminal, plain periodic lines when the
output goes to a log (a bar there is a stream of carriage-return frames), nothing when quiet.

FVGPT_PROGRESS_EVERY_S sets the interval of the plain lines (default 30 s).

The bar is tqdm.std's, never tqdm.auto's: tqdm.auto's class (tqdm.asyncio) calls iter() on the wrapped iterable
when the bar is made, and a DataLoader's iterator draws its base seed from the loader's generator, the one its
shuffle uses, so a bar changed the batch order and training depended on the terminal. No wrapper here may touch the
iterable before it is iterated.
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.std import tqdm

DEFAULT_EVERY_S = 30.0


def on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class PlainProgress:
    """Iterates like tqdm and prints "desc: n/total unit (p %), t s, postfix" to stderr at most every `every_s`."""

    def __init__(self, iterable: Iterable, desc: str, every_s: float, total: int | None = None, unit: str = "it"):
        self.iterable, self.desc, self.every_s, self.unit = iterable, desc, every_s, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, **values: object) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def __iter__(self) -> Iterator:
        start = last = time.monotonic()
        for n, item in enumerate(self.iterable, 1):
            yield item
            now = time.monotonic()
            if now - last >= self.every_s:
                last = now
                done = f"{n}/{self.total} {self.unit} ({100 * n / self.total:.0f} %)" if self.total else str(n)
                print(f"{self.desc}: {done}, {now - start:.0f} s" + (f", {self.postfix}" if self.postfix else ""),
                      file=sys.stderr, flush=True)


def track(iterable: Iterable, desc: str, enabled: bool = True, total: int | None = None, unit: str = "it"):
    """A progress wrapper with set_postfix: tqdm on a terminal, PlainProgress otherwise, silent when not enabled."""
    if not enabled:
        return PlainProgress(iterable, desc, math.inf, total, unit)
    if on_terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr)
    return PlainProgress(iterable, desc, float(os.environ.get("FVGPT_PROGRESS_EVERY_S", DEFAULT_EVERY_S)), total,
                         unit)


def note(message: str) -> None:
    """A line of its own that does not tear a bar on a terminal."""
    tqdm.write(message)
