"""Errors as each API's clients expect them.

One exception, `ApiError`, carries an HTTP status and what went wrong; how it
is written depends on the route's family: OpenAI's `{"error": {message, type,
param, code}}`, Ollama's `{"error": "..."}`, llama.cpp's `{"error": {code,
message, type}}`. Validation failures (FastAPI's would be 422s), unknown
routes and unexpected failures are turned into the same shapes, so no request
ever gets a body its client cannot parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

OPENAI, OLLAMA, LLAMACPP = "openai", "ollama", "llamacpp"
LLAMACPP_PATHS = ("/infill", "/completion")

_OPENAI_TYPES = {
    401: "invalid_request_error",
    403: "permission_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}
_LLAMACPP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "unavailable_error",
    500: "server_error",
    503: "unavailable_error",
}


class ApiError(Exception):
    """A request that cannot be served: `status` and a one-line `message`, and for OpenAI clients the
    field at fault (`param`) and a machine-readable `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _OPENAI_TYPES.get(status, "invalid_request_error")


def family_of(path: str) -> str:
    """Which API a path belongs to, for the shape of its errors."""
    if path.startswith("/api/"):
        return OLLAMA
    if path in LLAMACPP_PATHS:
        return LLAMACPP
    return OPENAI


def error_body(family: str, error: ApiError) -> dict[str, Any]:
    if family == OLLAMA:
        return {"error": error.message}
    if family == LLAMACPP:
        kind = _LLAMACPP_TYPES.get(error.status, "invalid_request_error")
        return {"error": {"code": error.status, "message": error.message, "type": kind}}
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def error_response(family: str, error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error_body(family, error), status_code=error.status, headers=headers)


# ----------------------------------------------------------------- validation errors


def validation_error(errors: Sequence[dict[str, Any]]) -> ApiError:
    """The first of pydantic's errors as a 400 naming the field."""
    if not errors:
        return ApiError(400, "invalid request body")
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = _param(loc)
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error") or first.get("msg", "")
        return ApiError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    if kind == "model_type" and not param:
        return ApiError(400, "the request body must be a JSON object")
    message = first.get("msg", "invalid value")
    if kind == "missing":
        message = "this field is required"
    return ApiError(400, f"{param}: {message}" if param else message, param=param or None)


def _param(loc: Sequence[Any]) -> str:
    """`("messages", 0, "content", "str")` -> `messages[0].content` (pydantic's union-member tags dropped)."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _is_type_tag(part):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "none"} or "[" in part or part.startswith(("function-", "literal"))


# ----------------------------------------------------------------- handlers


def install_error_handlers(app: FastAPI) -> None:
    """Every failure as its route family's error body (and 400, not FastAPI's 422, for bad input)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(family_of(request.url.path), error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(family_of(request.url.path), validation_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail)
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        code = "not_found" if error.status_code == 404 else None
        return error_response(family_of(request.url.path), ApiError(error.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises it after this answer, so the server's log gets the traceback.
        message = f"internal error: {' '.join(str(error).split()) or type(error).__name__}"
        return error_response(family_of(request.url.path), ApiError(500, message))
