"""Load generation against OpenAI-compatible endpoints: closed loop (fixed concurrency) or open loop (Poisson
arrivals), streaming, one `RequestRecord` per request with what the client saw.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class RequestRecord:
    """One request as the client saw it. Times in seconds; `start_s` from the run's start, the rest from the
    request's own start."""

    index: int = 0
    start_s: float = 0.0
    ok: bool = False
    error_kind: str | None = None  # connect | timeout | http_4xx | http_5xx | malformed_sse | incomplete_stream
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float = 0.0
    output_tokens: int = 0  # from usage when the target reports it, else one per content chunk
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    energy_joules: float | None = None
    energy_source: str | None = None

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive content chunks."""
        return [b - a for a, b in zip(self.chunk_times_s, self.chunk_times_s[1:], strict=False)]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def decode_tokens_per_s(self) -> float | None:
        tpot = self.tpot_s
        return 1.0 / tpot if tpot else None


def _chunk_text(payload: dict[str, Any]) -> str:
    choices = payload.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


def _read_usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    record.output_tokens = usage.get("completion_tokens") or 0
    record.prompt_tokens = usage.get("prompt_tokens")
    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if usage.get("energy_joules") is not None:
        record.energy_joules = float(usage["energy_joules"])
        record.energy_source = usage.get("energy_source")


async def stream_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
    into: RequestRecord | None = None, texts: list[str] | None = None,
) -> RequestRecord:
    """One streamed request, timed as the client sees it, into `into` (a fresh RequestRecord by default); the
    content chunks' text is appended to `texts` when given."""
    record = into if into is not None else RequestRecord()
    start = time.perf_counter()
    chunks = 0
    done = False
    try:
        async with client.stream("POST", url, json={**body, "stream": True}, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error_kind = "http_5xx" if response.status_code >= 500 else "http_4xx"
                record.error = f"HTTP {response.status_code}: {text[:300]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                payload = json.loads(data)
                if not isinstance(payload, dict):
                    raise ValueError(f"an SSE event is not a JSON object: {data[:80]}")
                if text := _chunk_text(payload):
                    if texts is not None:
                        texts.append(text)
                    now = time.perf_counter() - start
                    if record.ttft_s is None:
                        record.ttft_s = now
                    record.chunk_times_s.append(now)
                    chunks += 1
                if payload.get("usage"):
                    _read_usage(record, payload["usage"])
        if not done:
            record.error_kind = "incomplete_stream"
            record.error = f"the stream ended without 'data: [DONE]' after {chunks} chunks"
            return record
        record.output_tokens = record.output_tokens or chunks
        record.ok = True
    except httpx.ConnectError as e:
        record.error_kind, record.error = "connect", f"cannot connect to {url}: {e}"
    except httpx.TimeoutException as e:
        record.error_kind, record.error = "timeout", f"timed out: {type(e).__name__}"
    except httpx.HTTPError as e:  # the connection broke mid-stream
        record.error_kind, record.error = "incomplete_stream", f"{type(e).__name__}: {e}"
    except (ValueError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
        record.error_kind, record.error = "malformed_sse", f"malformed SSE event: {e}"
    finally:
        record.e2e_s = time.perf_counter() - start
    return record


async def run_load(
    url: str,
    bodies: Sequence[dict[str, Any]],
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    duration_s: float | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 600.0,
    seed: int = 0,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Closed loop (`concurrency` in flight) or open loop (Poisson arrivals at `rate` per second).

    Sends every body once, or, with `duration_s`, keeps cycling through them until that much time has passed.
    Returns the records (in completion order) and the wall time from the first send to the last answer.
    """
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency or rate")
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=concurrency or 1000, max_keepalive_connections=concurrency or 100)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        def next_index(i: int) -> int | None:
            if duration_s is None:
                return i if i < len(bodies) else None
            return i if time.perf_counter() - start < duration_s else None

        async def send(i: int) -> None:
            record = await stream_request(client, url, bodies[i % len(bodies)], headers)
            record.index = i
            record.start_s = sent_at[i]
            records.append(record)
            if on_done is not None:
                on_done(record)

        sent_at: dict[int, float] = {}
        if concurrency is not None:
            counter = 0

            async def worker() -> None:
                nonlocal counter
                while (i := next_index(counter)) is not None:
                    counter += 1
                    sent_at[i] = time.perf_counter() - start
                    await send(i)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = random.Random(seed)
            tasks = []
            i = 0
            while next_index(i) is not None:
                sent_at[i] = time.perf_counter() - start
                tasks.append(asyncio.create_task(send(i)))
                i += 1
                await asyncio.sleep(rng.expovariate(rate))  # type: ignore[arg-type]
            await asyncio.gather(*tasks)
        return records, time.perf_counter() - start

