"""The app factory: routes, auth, body limit, draining, health and metrics around one engine."""

from __future__ import annotations

import hmac
import json
import time

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qanat import __version__
from qanat.config import ServerConfig
from qanat.engine.engine import Engine
from qanat.server.errors import error_response, install_error_handlers
from qanat.server.metrics import ServerMetrics
from qanat.server.routes import router

OPEN_PATHS = ("/health", "/ready", "/metrics", "/docs", "/openapi.json")


class _BodyTooLargeError(Exception):
    pass


class GatewayMiddleware:
    """For /v1/: counts in-flight requests (for draining) and requests by status, refuses new work while
    draining, caps body size. Plain ASGI, so streamed responses pass through without extra buffering."""

    def __init__(self, app: ASGIApp, config: ServerConfig, state: dict[str, int | bool],
                 metrics: ServerMetrics) -> None:
        self.app = app
        self.config = config
        self.state = state
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._gate(scope, receive, counted_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()

    async def _gate(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.state["draining"]:
            draining = error_response(503, "the server is shutting down", "server_error", code="draining",
                                      headers={"Retry-After": "5"})
            await draining(scope, receive, send)
            return
        limit = self.config.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _too_large(limit)(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLargeError()
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.state["in_flight"] += 1
        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLargeError:
            if not started:
                await _too_large(limit)(scope, receive, send)
        finally:
            self.state["in_flight"] -= 1


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"the request body is larger than {limit} bytes", "invalid_request_error")



def _auth_dependency(keys: tuple[str, ...]):  # type: ignore[no-untyped-def]
    encoded = [k.encode() for k in keys]

    async def check(request: Request) -> None:
        if not encoded:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Compare against every key in constant time, so timing reveals neither which key nor how much matched.
        matched = False
        for key in encoded:
            matched |= hmac.compare_digest(token.strip().encode(), key)
        if scheme.lower() != "bearer" or not matched:
            raise _Unauthorized()

    return check


class _Unauthorized(Exception):
    pass


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="Qanat", version=__version__, description="OpenAI-compatible inference server")
    app.state.engine = engine
    app.state.metrics = ServerMetrics(engine)
    app.state.started_at = int(time.time())
    app.state.gateway = {"in_flight": 0, "draining": False}
    app.state.carbon = config.carbon
    install_error_handlers(app)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(_: Request, __: _Unauthorized) -> JSONResponse:
        return error_response(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                              "invalid_request_error", code="invalid_api_key")

    app.include_router(router, dependencies=[Depends(_auth_dependency(config.api_keys))])

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if app.state.gateway["draining"]:
            return error_response(503, "the server is draining", "server_error", code="draining")
        return JSONResponse({"status": "ready", "model": engine.model_id})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(GatewayMiddleware, config=config, state=app.state.gateway, metrics=app.state.metrics)
    return app


def startup_line(engine: Engine, config: ServerConfig) -> str:
    return json.dumps({
        "event": "ready", "url": f"http://{config.host}:{config.port}/v1", "model": engine.model_id,
        "model_path": str(engine.model_path), "ctx_per_request": engine.context_len,
        "parallel": engine.config.parallel, "threads": engine.config.threads,
        "auth": bool(config.api_keys), "energy_source": engine.energy.source, "grid": config.carbon.grid,
    })
