"""Progress of a job counted in images: a tqdm bar on a terminal, a plain line every FVGPT_PROGRESS_EVERY_S seconds
(default 30) in a log, nothing when quiet (fvgpt.progress's rule, for a count that grows by batches)."""
from __future__ import annotations

import os
import sys
import time

from tqdm.std import tqdm

from fvgpt.progress import DEFAULT_EVERY_S, on_terminal


class Counter:
    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False) \
            if enabled and on_terminal() else None
        self.every_s = float(os.environ.get("FVGPT_PROGRESS_EVERY_S", DEFAULT_EVERY_S)) if enabled else None
        self.start = self.last = time.monotonic()

    def update(self, n: int, **postfix: object) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.every_s is not None and now - self.last >= self.every_s:
            self.last = now
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f} %), "
                  f"{now - self.start:.0f} s{extra}", file=sys.stderr, flush=True)

    def __enter__(self) -> Counter:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
