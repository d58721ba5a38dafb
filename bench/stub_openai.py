"""A stub OpenAI-compatible server that answers at once: 16 one-word chunks, usage, [DONE], all in one write. For
measuring what a router in front of an upstream adds (bench/router_bench.py latency).

Plain ASGI with its answer built in advance, so that the stub itself costs as little CPU per request as it can:
on a 2-core machine the stub, the load generator and the router share the cores, and every microsecond the stub
spends is taken from the other two.

    .venv/bin/python bench/stub_openai.py --port 8101 [--delay-ms 50]

`--delay-ms` holds each answer that long before its first byte, as a real model's time to first token would: the
router then sees the request rate a real upstream allows, instead of as many requests as the loop can turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvicorn
from starlette.types import Receive, Scope, Send

CHUNKS = 16
DELAY_S = 0.0  # set by --delay-ms
_HEAD = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()), "model": "stub"}


def _event(payload: object) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _stream(include_usage: bool) -> bytes:
    events = [_event({**_HEAD, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
    for i in range(CHUNKS):
        choice = {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}
        events.append(_event({**_HEAD, "choices": [choice]}))
    events.append(_event({**_HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
    if include_usage:
        usage = {"prompt_tokens": 8, "completion_tokens": CHUNKS, "total_tokens": 8 + CHUNKS}
        events.append(_event({**_HEAD, "choices": [], "usage": usage}))
    return b"".join(events) + b"data: [DONE]\n\n"


_STREAMS = {usage: _stream(usage) for usage in (False, True)}
_JSON = {"/v1/models": json.dumps({"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "stub"}]}),
         "/health": '{"status": "ok"}', "/ready": '{"status": "ok"}'}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        include_usage = bool((json.loads(body).get("stream_options") or {}).get("include_usage"))
        if DELAY_S:
            await asyncio.sleep(DELAY_S)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": _STREAMS[include_usage]})
        return
    answer = _JSON.get(scope["path"])
    await send({"type": "http.response.start", "status": 200 if answer else 404,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": (answer or '{"error": "not found"}').encode()})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    DELAY_S = args.delay_ms / 1000
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
