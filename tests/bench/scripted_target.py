"""A stand-in OpenAI endpoint that streams scripted tokens at known intervals: the ruler `qanat bench` is
checked against, and a source of every bad condition (4xx, 5xx, malformed SSE, streams cut short).

    python -m tests.bench.scripted_target PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

TTFT_S = 0.200
ITL_S = 0.025
TOKENS = 20
JOULES = 2.0


def _chunk(text: str) -> str:
    payload = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return f"data: {json.dumps(payload)}\n\n"


async def models(_: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})


async def completions(request: Request) -> Response:
    body = await request.json()
    model = body.get("model")
    if model == "http400":
        return JSONResponse({"error": {"message": "bad", "type": "invalid_request_error"}}, status_code=400)
    if model == "http500":
        return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)

    async def stream():  # type: ignore[no-untyped-def]
        await asyncio.sleep(TTFT_S)
        for i in range(TOKENS):
            if i:
                await asyncio.sleep(ITL_S)
            if model == "malformed" and i == 3:
                yield "data: {this is not json\n\n"
                return
            if model == "cut" and i == 5:
                return  # the connection ends without [DONE]
            yield _chunk(f"t{i} ")
        usage = {"prompt_tokens": 10, "completion_tokens": TOKENS, "total_tokens": 10 + TOKENS,
                 "energy_joules": JOULES, "energy_source": "measured:scripted"}
        yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


app = Starlette(routes=[
    Route("/v1/models", models),
    Route("/v1/chat/completions", completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
