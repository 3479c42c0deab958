"""The engine's one error type: an HTTP status, a message naming the problem and what to do, and the headers a client
needs (Retry-After, WWW-Authenticate). Rendered as {"error": "<message>"} by whoever answers."""
from __future__ import annotations

from fvgpt_runtime.images import InputError


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    @classmethod
    def of_input(cls, exc: InputError, prefix: str = "") -> ApiError:
        """A runtime InputError as the client's error: 413 when something is over a size limit, else 400."""
        return cls(413 if exc.too_large else 400, f"{prefix}{exc}")


def retry_later(message: str, seconds: int = 1) -> ApiError:
    """A 503 that waiting can fix."""
    return ApiError(503, message, {"Retry-After": str(seconds)})
