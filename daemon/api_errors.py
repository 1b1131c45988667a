"""Errors answered to one request (never fatal to the daemon), with their HTTP status."""

from __future__ import annotations

from typing import Any

from htrctl.protocol import ERROR_STATUS, ErrorBody


class ApiError(Exception):
    """One request failed: ``type`` is a protocol ErrorType; ``status`` its HTTP status (by default the
    type's, :data:`htrctl.protocol.ERROR_STATUS`)."""

    def __init__(self, type_: str, message: str, *, status: int | None = None, detail: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
        self.status = status or ERROR_STATUS.get(type_, 500)
        self.detail = detail
        self.retry_after = retry_after

    def body(self) -> ErrorBody:
        return ErrorBody(type=self.type, message=self.message, detail=self.detail)

    def envelope(self) -> dict[str, Any]:
        return {"error": self.body().model_dump()}
