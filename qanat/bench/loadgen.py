"""A closed-loop load generator for OpenAI-compatible endpoints, streaming, with per-request timings."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestRecord:
    """One request as the client saw it. Times in seconds from the request's start."""

    ok: bool = False
    ttft_s: float | None = None
    e2e_s: float = 0.0
    output_tokens: int = 0  # from usage when the target reports it, else one per content chunk
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generation speed after the first token: (tokens - 1) / (e2e - ttft)."""
        if self.ttft_s is None or self.output_tokens < 2 or self.e2e_s <= self.ttft_s:
            return None
        return (self.output_tokens - 1) / (self.e2e_s - self.ttft_s)


def _chunk_text(payload: dict[str, Any]) -> str:
    choices = payload.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


async def stream_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> RequestRecord:
    record = RequestRecord()
    start = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if _chunk_text(payload):
                    now = time.perf_counter() - start
                    if record.ttft_s is None:
                        record.ttft_s = now
                    record.chunk_times_s.append(now)
                    chunks += 1
                usage = payload.get("usage")
                if usage:
                    record.output_tokens = usage.get("completion_tokens", 0)
                    record.prompt_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    record.cached_tokens = details.get("cached_tokens")
        record.output_tokens = record.output_tokens or chunks
        record.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
    finally:
        record.e2e_s = time.perf_counter() - start
    return record


async def run_closed_loop(
    url: str, bodies: Sequence[dict[str, Any]], concurrency: int, headers: dict[str, str] | None = None,
    timeout_s: float = 600.0,
) -> tuple[list[RequestRecord], float]:
    """Send `bodies` with at most `concurrency` in flight; returns the records and the wall time."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                records.append(await stream_request(client, url, body, headers))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return records, time.perf_counter() - start
