"""Helpers for driving an engine (real or fake) from synchronous tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import uvicorn

from qanat.engine.client import ChatPrompt, Delta, TokenPrompt
from qanat.engine.local import LocalEngine
from qanat.engine.sampling import SamplingParams
from tests.e2e.server import free_port

T = TypeVar("T")


async def collect(engine: LocalEngine, prompt_ids: list[int], params: SamplingParams) -> list[Delta]:
    return [d async for d in engine.generate(TokenPrompt(tuple(prompt_ids)), params)]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def collect_together(engine: LocalEngine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[Delta]]:
    """Every request's deltas, the requests sent at once (so they share the engine's steps)."""

    async def together() -> list[list[Delta]]:
        return list(await asyncio.gather(*(collect(engine, ids, params) for ids, params in requests)))

    return run(together())


def chat_ids(engine: LocalEngine, user: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    return list(engine.render_sync(ChatPrompt((*messages, {"role": "user", "content": user}))).token_ids)


def tokenize(engine: LocalEngine, text: str) -> list[int]:
    return engine.tokenizer.tokenize(text, add_special=True)


def detokenize(engine: LocalEngine, token_ids: list[int]) -> str:
    return b"".join(engine.tokenizer.token_bytes(t) for t in token_ids).decode("utf-8", errors="replace")


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """An ASGI app on a real socket (127.0.0.1, a free port) in a background thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
