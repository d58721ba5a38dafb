"""The one place that maps exceptions to HTTP statuses, always in OpenAI's error shape.

`describe` is the table; the exception handlers answer with it before a response starts, and `error_body`
writes the same error as an SSE event once a stream has begun.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qanat.engine.errors import EngineUnavailableError, InvalidRequestError, QueueFullError, RequestFailedError
from qanat.engine.remote import UpstreamError
from qanat.guard.rails import ContentFilterError
from qanat.models.chat_template import ChatTemplateError

log = logging.getLogger("qanat.server")


class ModelNotFoundError(LookupError):
    pass


class ClientDisconnectedError(Exception):
    """The client went away; its request was cancelled. Nobody is left to answer."""


class UnauthorizedError(Exception):
    pass


@dataclass(frozen=True)
class ApiError:
    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    retry_after_s: int | None = None


def describe(exc: BaseException) -> ApiError:
    match exc:
        case UpstreamError():
            raw = exc.body.get("error")
            error: dict[str, Any] = raw if isinstance(raw, dict) else {}
            return ApiError(exc.status, str(error.get("message") or exc), str(error.get("type") or "upstream_error"),
                            error.get("param"), error.get("code"))
        case ContentFilterError():
            return ApiError(400, str(exc), "invalid_request_error", exc.param, "content_filter")
        case InvalidRequestError():
            return ApiError(400, str(exc), "invalid_request_error", exc.param)
        case ChatTemplateError():
            return ApiError(400, str(exc), "invalid_request_error", "messages")
        case UnauthorizedError():
            return ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                            "invalid_request_error", code="invalid_api_key")
        case ModelNotFoundError():
            return ApiError(404, str(exc), "invalid_request_error", "model", "model_not_found")
        case QueueFullError():
            return ApiError(429, str(exc), "rate_limit_error", code="queue_full", retry_after_s=1)
        case ClientDisconnectedError():
            return ApiError(499, "client closed the request", "invalid_request_error")
        case RequestFailedError():
            return ApiError(500, str(exc), "server_error")
        case EngineUnavailableError():
            return ApiError(503, str(exc), "server_error", code="engine_unavailable", retry_after_s=1)
    log.error("unhandled error", exc_info=exc)
    return ApiError(500, "internal server error", "server_error")


def error_body(exc: BaseException) -> dict[str, dict[str, str | None]]:
    e = describe(exc)
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def exception_response(exc: BaseException) -> JSONResponse:
    if isinstance(exc, UpstreamError):  # an upstream's 4xx travels on as it was sent
        return JSONResponse(exc.body, status_code=exc.status)
    e = describe(exc)
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
    return error_response(e.status, e.message, e.type, e.param, e.code, headers)


def bearer_key_matches(authorization: bytes, keys: list[bytes]) -> bool:
    """`Authorization: Bearer KEY` with one of `keys`, compared against every key in constant time, so timing
    reveals neither which key nor how much matched."""
    scheme, _, token = authorization.partition(b" ")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.strip(), key)
    return scheme.lower() == b"bearer" and matched


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(), None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))

    async def _known(_: Request, exc: Exception) -> JSONResponse:
        return exception_response(exc)

    # Each class registered by name: a handler for Exception alone runs outside the app's middleware, and
    # Starlette re-raises after it answers.
    for cls in (InvalidRequestError, ContentFilterError, ChatTemplateError, UnauthorizedError, ModelNotFoundError,
                QueueFullError,
                ClientDisconnectedError, RequestFailedError, EngineUnavailableError, UpstreamError, Exception):
        app.add_exception_handler(cls, _known)
