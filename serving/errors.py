"""API errors: one exception type carrying the HTTP status, rendered as {"error": "<message>"}.

Our own JSONResponse, not BentoMLException: BentoML 1.4.40 renders 4xx BentoMLExceptions as a JSON list.
"""
from __future__ import annotations

from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)
