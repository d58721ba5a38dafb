"""The app factory: routes, auth, body limit, draining, health and metrics around one EngineClient."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qanat import __version__
from qanat.config import ServerConfig
from qanat.engine.client import EngineClient
from qanat.guard.policy import GuardrailsPolicy
from qanat.guard.rails import Guard
from qanat.router.router import ModelRouter
from qanat.serving.errors import UnauthorizedError, bearer_key_matches, error_response, install_error_handlers
from qanat.serving.live import LiveSampler, live_route
from qanat.serving.metrics import ServerMetrics
from qanat.serving.moderations import router as moderations_router
from qanat.serving.relay import RelayMiddleware
from qanat.serving.routes import router as openai_router
from qanat.serving.state import AppState, Gateway, ModelRegistry, app_state


class _BodyTooLargeError(Exception):
    pass


class GatewayMiddleware:
    """For /v1/: counts in-flight requests (for draining) and requests by status, refuses new work while
    draining, caps body size. Plain ASGI, so streamed responses pass through without extra buffering."""

    def __init__(self, app: ASGIApp, config: ServerConfig, gateway: Gateway, metrics: ServerMetrics) -> None:
        self.app = app
        self.config = config
        self.gateway = gateway
        self.metrics = metrics
        # The request counter's children, memoized by label values: labels() locks and validates on every call.
        self._requests_for = functools.cache(metrics.requests.labels)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 0  # until the response starts
        received = 0
        limit = self.config.max_body_bytes

        async def watched_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLargeError()
            return message

        length = dict(scope["headers"]).get(b"content-length")
        try:
            if self.gateway.draining:
                await error_response(503, "the server is shutting down", "server_error", code="draining",
                                     headers={"Retry-After": "5"})(scope, receive, watched_send)
            elif length is not None and (not length.isdigit() or int(length) > limit):
                await _too_large(limit)(scope, receive, watched_send)
            else:
                self.gateway.in_flight += 1
                try:
                    await self.app(scope, counted_receive, watched_send)
                except _BodyTooLargeError:
                    if not status:
                        await _too_large(limit)(scope, receive, watched_send)
                finally:
                    self.gateway.in_flight -= 1
        finally:
            self._requests_for(getattr(scope.get("route"), "path", "unmatched"), str(status or 500)).inc()


class QanatApp(FastAPI):
    """FastAPI with the gateway and the byte relay in front of all of it (its telemetry, error pages, routing,
    dependencies): a relayed request never enters FastAPI, which was a third of a router's CPU per request
    (relay.py). An error that escapes the front still becomes a 500, from uvicorn."""

    front: Callable[[ASGIApp], ASGIApp] | None = None  # wraps FastAPI's own __call__ for http requests
    _fronted: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None or scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        if self._fronted is None:
            self._fronted = self.front(super().__call__)
        await self._fronted(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"the request body is larger than {limit} bytes", "invalid_request_error")


def require_api_key(keys: tuple[str, ...]) -> Callable[[Request], Awaitable[None]]:
    """The one auth dependency, on every route but /health and /ready."""
    encoded = [k.encode() for k in keys]

    async def check(request: Request) -> None:
        if encoded and not bearer_key_matches(request.headers.get("authorization", "").encode("latin-1"), encoded):
            raise UnauthorizedError()

    return check


def _probes() -> APIRouter:
    probes = APIRouter()

    @probes.get("/health")
    async def health() -> dict[str, str]:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @probes.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """It can take work now (readiness): not draining, and the engine has a live executor."""
        state = app_state(request)
        if state.gateway.draining:
            return error_response(503, "the server is draining", "server_error", code="draining")
        health = state.models.health()
        if not health.ready:
            return error_response(503, f"the engine is not ready: {health.detail}", "server_error",
                                  code="engine_unavailable", headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "models": state.models.names, "restarts": health.restarts,
                             "executor_pid": health.executor_pid})

    return probes


def _metrics_route() -> APIRouter:
    metrics = APIRouter()

    @metrics.get("/metrics")
    async def scrape(request: Request) -> Response:
        return Response(generate_latest(app_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


def _docs_routes(app: FastAPI) -> APIRouter:
    """/openapi.json and /docs, behind the same auth as the API they describe."""
    docs = APIRouter(include_in_schema=False)

    @docs.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @docs.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Qanat")

    return docs


def create_app(models: ModelRegistry | EngineClient, config: ServerConfig,
               guardrails: GuardrailsPolicy | None = None) -> FastAPI:
    registry = models if isinstance(models, ModelRegistry) else ModelRegistry.of(models)
    routers = [m for m in registry if isinstance(m, ModelRouter)]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Routers probe their remote replicas and pool connections on the serving event loop.
        for router in routers:
            await router.start()
        sampling = asyncio.create_task(state.live.run())  # /metrics/live's samples, while the app is served
        yield
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        for router in routers:
            await router.stop()

    app = QanatApp(title="Qanat", version=__version__, description="OpenAI-compatible inference server",
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = ServerMetrics(registry)
    for router_metrics in {id(r.metrics): r.metrics for r in routers}.values():
        metrics.include(router_metrics)
    state = AppState(models=registry, config=config, metrics=metrics, live=LiveSampler(registry, metrics),
                     guard=Guard(guardrails, metrics) if guardrails is not None else None)
    app.state.qanat = state
    install_error_handlers(app)
    auth = [Depends(require_api_key(config.api_keys))]
    app.include_router(_probes())
    app.include_router(openai_router, dependencies=auth)
    app.include_router(moderations_router, dependencies=auth)
    app.include_router(_metrics_route(), dependencies=auth)
    app.include_router(live_route(state.live), dependencies=auth)
    app.include_router(_docs_routes(app), dependencies=auth)
    if config.webui:
        from qanat.webui.routes import page_router

        app.include_router(page_router(auth_required=bool(config.api_keys)))
    app.front = lambda inner: GatewayMiddleware(RelayMiddleware(inner, state), config, state.gateway, state.metrics)
    return app


def startup_line(models: ModelRegistry, config: ServerConfig) -> str:
    return json.dumps({
        "event": "ready", "url": f"http://{config.host}:{config.port}/v1", "auth": bool(config.api_keys),
        "webui": f"http://{config.host}:{config.port}/" if config.webui else None,
        "models": [{"id": m.card.id, "context_length": m.card.context_length, "chip": m.card.chip,
                    "energy_source": m.card.energy_source} for m in models],
        "grid": config.carbon.grid, "executor_pid": models.health().executor_pid,
    })
