"""Admission control: one budget of bytes for everything requests in flight hold.

A request reserves twice its body before the body is read (the body, and the copy parsing makes: multipart file
parts, or base64 text and its decoded bytes; from Content-Length, or growing with the chunks of a body without one),
shrinks that to its images' bytes once parsed, and adds what decoding them will hold at most once their headers are
read (engine/decode.py, `decode_peak`). What does not fit now gets a 503 with Retry-After naming
FVGPT_MAX_INFLIGHT_BYTES; what could never fit, even on an idle server, a 413 naming it. So a burst of large bodies
or huge images cannot grow the process without bound; the reservation is returned when the request is answered.

Memory held after a burst. glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB)
and gives each thread an arena of its own (up to 8 per core), so the buffers of a burst (bodies, decoded images)
end up in arenas it keeps: the server process stayed 50–80 MiB above its baseline after each burst of 16 × 26 MiB
bodies. `tune_malloc` (called once by the engine) fixes the threshold at 128 KiB, so buffers that size or larger are
mapped and unmapped on their own, and caps the arenas at 2; measured, RSS then returns to its baseline
(serving/README.md).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

from .errors import ApiError, retry_later

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 128 << 10
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Set glibc's mmap threshold and arena cap for this process (False where the C library is not glibc). Like
    MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2 in the environment, but set by the process itself, so it holds
    however the server was started."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_ARENA_MAX, ARENA_MAX))


class InflightBudget:
    """Bytes held by requests in flight, against a cap. Thread-safe."""

    def __init__(self, cap: int):
        self.cap = cap
        self.held = 0
        self._lock = threading.Lock()

    def admit(self, size: int) -> Reservation:
        """Reserve `size` bytes for a new client request, or refuse it (503 / 413, see Reservation.grow); growing the
        reservation later is refused the same way."""
        reservation = Reservation(self, capped=True)
        reservation.grow(size)
        return reservation

    def hold(self, size: int) -> Reservation:
        """Reserve `size` bytes whatever the cap, and let it grow so (the readiness canary: counted, never
        refused)."""
        reservation = Reservation(self, capped=False)
        reservation.grow(size)
        return reservation

    def _change(self, delta: int, capped: bool) -> bool:
        with self._lock:
            if capped and delta > 0 and self.held + delta > self.cap:
                return False
            self.held += delta
            return True


class Reservation:
    """Bytes one request holds; `grow` and `resize` as they change, `release` at the end (idempotent)."""

    def __init__(self, budget: InflightBudget, capped: bool):
        self.budget, self.capped, self.size = budget, capped, 0

    def grow(self, size: int) -> None:
        """Hold `size` bytes in all. If the budget cannot take the growth (what it held is kept): a 413 when `size`
        alone is over the cap (waiting cannot help), else a 503 with Retry-After."""
        if self.capped and size > self.budget.cap:
            raise ApiError(413, f"this request needs {size} bytes of memory to decode (its body and images); the "
                                f"server holds at most {self.budget.cap} for all requests together "
                                f"(FVGPT_MAX_INFLIGHT_BYTES): send fewer or smaller images per request")
        if not self.budget._change(size - self.size, self.capped):
            raise retry_later(f"the server is holding {self.budget.held} bytes of request bodies and images (limit "
                              f"{self.budget.cap}, FVGPT_MAX_INFLIGHT_BYTES) and this request needs {size}; retry "
                              f"shortly")
        self.size = size

    def resize(self, size: int) -> None:
        """Hold `size` bytes in all, whatever the cap (shrinking)."""
        self.budget._change(size - self.size, capped=False)
        self.size = size

    def release(self) -> None:
        self.resize(0)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
