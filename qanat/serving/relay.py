"""The byte relay's route: a streamed request to a model served only by plain OpenAI-compatible upstreams (a
router's remote replicas) is answered here, below FastAPI, with the upstream's SSE bytes as they come.

A router in front of an upstream should add no Python work per token and little per request (issue 12: ≤ 2 ms
p50 at concurrency 16). FastAPI's routing, dependency solving and middleware stack, and StreamingResponse's
task group per response, were about a third of the router's CPU per relayed request; this route skips them.
It decides nothing of its own: the body is validated by the same pydantic models and range checks as the full
pipeline, and any request it cannot prove relayable (not streamed, tools, guardrails configured, a model with
local or Qanat replicas, no valid key, a body that fails validation) falls through to FastAPI with its body
intact, where the pipeline serves it or answers the error. It and GatewayMiddleware sit outside FastAPI's own
middleware (app.QanatApp), so draining, the body limit and request counting apply as to any /v1/ request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass

from pydantic import ValidationError
from pydantic_core import from_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qanat.engine.client import ByteRelay, RelayedStream, RequestHints
from qanat.engine.errors import InvalidRequestError
from qanat.serving.errors import bearer_key_matches, error_body, exception_response
from qanat.serving.pipeline import sse_event
from qanat.serving.protocol import ChatCompletionRequest, CompletionRequest
from qanat.serving.state import AppState
from qanat.serving.tools import uses_tools

log = logging.getLogger("qanat.server")


@dataclass(frozen=True)
class RelayRoute:
    """An endpoint the relay may answer; set as the scope's "route" so request metrics label it as FastAPI
    would."""

    path: str  # as the client sent it, e.g. /v1/chat/completions
    upstream_path: str  # the same endpoint under an upstream's base URL (which ends in /v1)
    model: type[ChatCompletionRequest] | type[CompletionRequest]


ROUTES = {r.path: r for r in (RelayRoute("/v1/chat/completions", "/chat/completions", ChatCompletionRequest),
                              RelayRoute("/v1/completions", "/completions", CompletionRequest))}
WATCH_AFTER_S = 0.02  # how long a relayed answer runs before a task watches for its client leaving (_answer)
_SSE_END = b"data: [DONE]\n\n"
_SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class RelayMiddleware:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.keys = [k.encode() for k in state.config.api_keys]
        # The models that may be relayed, found once (isinstance on a runtime Protocol is slow); none where
        # guardrails check every request.
        self.relays: dict[str, ByteRelay] = {} if state.guard is not None else {
            name: engine for name, engine in zip(state.models.names, state.models, strict=True)
            if isinstance(engine, ByteRelay)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or not self.relays:
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        try:
            started = self._start(route, scope, raw)
        except Exception:  # a bug here: the pipeline meets it too, and answers it as a 500 in OpenAI's shape
            log.exception("the relay could not take a request; the pipeline serves it")
            started = None
        if started is None:
            await self.app(scope, _replay(raw, receive), send)
            return
        scope["route"] = route
        await _answer(started, scope, receive, send)

    def _start(self, route: RelayRoute, scope: Scope, raw: bytes) -> Awaitable[RelayedStream] | None:
        """The relay, started, when this request is one it may serve; None to hand it to the full pipeline."""
        headers = dict(scope["headers"])
        if self.keys and not bearer_key_matches(headers.get(b"authorization", b""), self.keys):
            return None
        try:
            request = from_json(raw)  # once: checked here, then sent as the client sent it
        except ValueError:
            return None
        if not isinstance(request, dict) or request.get("stream") is not True:
            return None
        model = request.get("model")
        engine = self.relays.get(model) if isinstance(model, str) else None
        if engine is None or not engine.can_relay():
            return None  # the cheap tests first: requests for other models pay one parse here
        try:
            # As FastAPI validates a body (parsed JSON into the model), then the pipeline's range checks.
            body = route.model.model_validate(request)
            if uses_tools(body):
                return None
            body.sampling_params()
            prompt = body.prompts()[0]
        except (ValidationError, InvalidRequestError, ValueError):
            return None
        session = headers.get(b"x-session-id", b"").decode("latin-1") or body.user
        hints = RequestHints(session=session, user=body.user)
        return engine.relay(route.upstream_path, request, prompt, hints)


async def _answer(started: Awaitable[RelayedStream], scope: Scope, receive: Receive, send: Send) -> None:
    """Wait for the upstream's first bytes, then stream them. A client that leaves, before or during the stream,
    cancels this task, and with it the upstream request (its replica freed); a failure before the first bytes is
    answered as the pipeline answers it."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    watcher: asyncio.Task[None] | None = None

    def client_left(_: object) -> None:
        task.cancel()

    def watch() -> None:
        nonlocal watcher
        watcher = loop.create_task(_disconnected(receive))
        watcher.add_done_callback(client_left)

    def stop_watching() -> None:
        watch_later.cancel()
        if watcher is not None:
            watcher.remove_done_callback(client_left)
            watcher.cancel()

    # The watcher is a task of its own, ≈10 % of a relayed request's CPU where the upstream answers at once; an
    # answer that ends within WATCH_AFTER_S needs none, and a client leaving a longer one is seen that much later.
    watch_later = loop.call_later(WATCH_AFTER_S, watch)
    try:
        try:
            relayed = await started
        except Exception as e:
            await exception_response(e)(scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*_SSE_HEADERS, (b"x-qanat-replica", relayed.replica.encode())]})
            ended = False
            async for data in relay_sse(relayed.chunks):
                if not ended:  # nothing follows [DONE]; the rest is read so that the connection can be reused
                    # The stream's last event ends the response in the same write (one syscall of three).
                    ended = data.endswith(_SSE_END)
                    await send({"type": "http.response.body", "body": data, "more_body": not ended})
                    if ended:
                        stop_watching()  # a complete response reads as a disconnect; the upstream's tail is ours
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await relayed.chunks.aclose()
    except asyncio.CancelledError:
        if watcher is None or not watcher.done() or watcher.cancelled():
            raise  # cancelled from above (shutdown), not by the client leaving
    finally:
        stop_watching()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def relay_sse(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """The upstream's bytes as they come, whole events only (a cut between reads is held until its end comes);
    a failure mid-stream drops a half-sent event and ends the stream with an error event, as the pipeline's
    streams do."""
    pending = b""
    try:
        async for data in chunks:
            data = pending + data
            end = data.rfind(b"\n\n") + 2  # 1 when no event ends in it
            if end == 1:
                pending = data
                continue
            pending = data[end:]
            yield data[:end]
    except Exception as e:
        log.warning("relayed stream failed after its first bytes: %s", e)
        yield sse_event(error_body(e)).encode()
        yield _SSE_END
        return
    if pending:
        yield pending


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(raw: bytes, receive: Receive) -> Receive:
    """`receive` for the app behind: the body already read, then the connection's own messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed

