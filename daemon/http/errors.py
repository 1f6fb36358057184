"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import re
from typing import Final

import msgspec

from ..engine_api import EngineError
from .schemas import ErrorBody, ErrorDetail

# status -> the OpenAI-style error `type`
ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable_error",
}

# EngineError / socket error codes -> HTTP status
ENGINE_STATUS: Final = {"invalid_request": 400, "overloaded": 429, "shutting_down": 503, "internal": 500}

_PARAM = re.compile(r"^`?([a-z_]+)(?:\[\d+\])?`?(?::| must| is| may)")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param if param is not None else guess_param(message)

    def body(self) -> bytes:
        detail = ErrorDetail(self.message, ERROR_TYPES.get(self.status, "invalid_request_error"), self.param, self.code)
        return msgspec.json.encode(ErrorBody(detail))

    @classmethod
    def from_engine(cls, exc: EngineError) -> ApiError:
        return cls.from_code(exc.code, exc.message)

    @classmethod
    def from_code(cls, code: str, message: str) -> ApiError:
        status = ENGINE_STATUS.get(code, 500)
        return cls(status, _sentence(message), code=code, param=guess_param(message) if status == 400 else None)


def guess_param(message: str) -> str | None:
    """The field an engine or validation message names first (`max_tokens` ..., prompt: ...)."""
    m = _PARAM.match(message)
    return m.group(1) if m else None


def _sentence(message: str) -> str:
    message = message.strip()
    return message[:1].upper() + message[1:] + ("" if message.endswith((".", "?", "!")) else ".")
