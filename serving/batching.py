"""How the encoder's adaptive batcher decides when to run a batch: as soon as the tower is free.

BentoML 1.4.40's CorkDispatcher (bentoml/_internal/marshal/dispatcher.py) holds a request back ("corks") while
`n · (wn + a) <= wait · 0.95`, where `wait` is its Optimizer's average, over the last 50 batches, of how long the
first request of a batch waited before the batch ran. That wait includes the time requests spend queued behind a
running batch, so a burst at concurrency 16 teaches it tens of milliseconds; afterwards a lone request is held back
for about that long, its own wait keeps the average up (it decays by 5% per refresh at most, and refreshes only on
batches), and idle latency stays high: on the tiny model 23 ms before a burst of 1,500 requests, 96 ms after it and
10 s later (the issue saw 9 → 39–56 ms). Holding requests back buys nothing here: while a batch runs the next one
fills up anyway, and on a CPU the tower's images/s hardly depend on the batch size (serving/README.md). So `wait` is
kept at 0: a batch runs as soon as the tower is free, with everything that queued meanwhile (up to
--max-batch-size). The Optimizer's latency model (o_a, o_b), which decides when a request cannot meet
FVGPT_MAX_LATENCY_MS, is untouched.
"""
from __future__ import annotations


def run_batches_when_free() -> None:
    """Make every CorkDispatcher of this process dispatch without corking (idempotent; the encoder calls it)."""
    from bentoml._internal.marshal.dispatcher import Optimizer

    if getattr(Optimizer.trigger_refresh, "fvgpt_no_cork", False):
        return
    refresh = Optimizer.trigger_refresh

    def trigger_refresh(self: Optimizer) -> None:
        refresh(self)
        self.wait = 0

    trigger_refresh.fvgpt_no_cork = True  # type: ignore[attr-defined]
    Optimizer.trigger_refresh = trigger_refresh
