"""Errors in the OpenAI error schema: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

# The "type" OpenAI's API puts in its error bodies for each status.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to return to the client with its status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def engine_unavailable(error: BaseException) -> APIError:
    """503 for every request (and /health) once the engine is gone (its process exited)."""
    return APIError(503, f"The engine is not running: {error}", code="engine_dead")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming the offending field, from FastAPI's validation errors."""
    return invalid_request(exc.errors())


def invalid_request(errors: list[dict]) -> APIError:
    """A 400 naming the offending field, from pydantic's error list (``ValidationError.errors()``)."""
    if not errors:
        return bad_request("Invalid request body")
    json_error = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if json_error is not None:
        detail = (json_error.get("ctx") or {}).get("error", json_error.get("msg", ""))
        return bad_request(f"Request body is not valid JSON: {detail}", code="invalid_json")
    # For a union, pydantic reports one error per member; the deepest is the most specific.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = ".".join(_field_path(first.get("loc", ()))) or None
    if first.get("type") == "missing":
        return bad_request(f"Missing required field: {param}", param=param, code="missing_required_parameter")
    message = first.get("msg", "invalid value")
    return bad_request(f"Invalid value for {param}: {message}" if param else message, param=param)


def _field_path(loc) -> list[str]:
    """The location as the client wrote it: pydantic also lists union members tried
    ("list[str]", "NamedToolChoice"); API field names are lower snake_case, so those go."""
    parts = []
    for p in loc:
        p = str(p)
        if p == "body" and not parts or "[" in p or p[:1].isupper():
            continue
        parts.append(p)
    return parts
