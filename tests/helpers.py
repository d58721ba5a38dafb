"""Helpers for driving the real engine from synchronous tests."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from qanat.engine.engine import Engine
from qanat.engine.types import Delta, SamplingParams

T = TypeVar("T")


async def collect(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> list[Delta]:
    return [d async for d in engine.generate(prompt_ids, params)]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def chat_ids(engine: Engine, user: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    return engine.chat_prompt_ids(messages + [{"role": "user", "content": user}])


def tokens_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)
