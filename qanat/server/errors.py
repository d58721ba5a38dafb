"""The one place that maps exceptions to HTTP statuses, always in OpenAI's error shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qanat.engine.types import InvalidRequestError, QueueFullError, RequestFailedError
from qanat.models.chat_template import ChatTemplateError

log = logging.getLogger("qanat.server")


class ModelNotFoundError(LookupError):
    pass


class ClientDisconnectedError(Exception):
    """The client went away; its request was cancelled. Nobody is left to answer."""


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


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

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_: Request, exc: InvalidRequestError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(ChatTemplateError)
    async def _template(_: Request, exc: ChatTemplateError) -> JSONResponse:
        return error_response(400, str(exc), "invalid_request_error", "messages")

    @app.exception_handler(ModelNotFoundError)
    async def _model(_: Request, exc: ModelNotFoundError) -> JSONResponse:
        return error_response(404, str(exc), "invalid_request_error", "model", "model_not_found")

    @app.exception_handler(QueueFullError)
    async def _full(_: Request, exc: QueueFullError) -> JSONResponse:
        return error_response(429, str(exc), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    @app.exception_handler(RequestFailedError)
    async def _failed(_: Request, exc: RequestFailedError) -> JSONResponse:
        return error_response(500, str(exc), "server_error")

    @app.exception_handler(ClientDisconnectedError)
    async def _gone(_: Request, exc: ClientDisconnectedError) -> JSONResponse:
        return error_response(499, "client closed the request", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal server error", "server_error")
