"""A stub OpenAI-compatible server that answers at once: 16 one-word chunks, usage, [DONE]. For measuring what a
router in front of an upstream adds (bench/router_bench.py latency).

    .venv/bin/python bench/stub_openai.py --port 8101
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

CHUNKS = 16


async def models(_: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "stub"}]})


async def ok(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def chat(request: Request) -> Response:
    body = await request.json()
    head = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()), "model": "stub"}

    async def events() -> AsyncIterator[str]:
        yield f"data: {json.dumps({**head, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}}]})}\n\n"
        for i in range(CHUNKS):
            choice = {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        done = {"index": 0, "delta": {}, "finish_reason": "length"}
        yield f"data: {json.dumps({**head, 'choices': [done]})}\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 8, "completion_tokens": CHUNKS, "total_tokens": 8 + CHUNKS}
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


app = Starlette(routes=[Route("/v1/models", models), Route("/health", ok), Route("/ready", ok),
                        Route("/v1/chat/completions", chat, methods=["POST"])])

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8101)
    uvicorn.run(app, host="127.0.0.1", port=parser.parse_args().port, log_level="warning")
