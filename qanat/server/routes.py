"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from qanat.engine.engine import Engine
from qanat.engine.types import Delta, InvalidRequestError, SampledLogprobs, SamplingParams
from qanat.server.errors import ClientDisconnectedError, ModelNotFoundError
from qanat.server.metrics import ServerMetrics
from qanat.server.protocol import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1")
T = TypeVar("T")

Job = tuple[list[int], SamplingParams]  # one choice: prompt ids and its sampling params


@dataclass
class _Choice:
    text: str = ""
    logprobs: list[SampledLogprobs] = field(default_factory=list)
    last: Delta | None = None


@dataclass
class _Timing:
    """Per-request latencies as the client sees them, fed to the Prometheus histograms."""

    metrics: ServerMetrics
    start_s: float = field(default_factory=time.perf_counter)
    last_token_s: float | None = None

    def token(self) -> None:
        now = time.perf_counter()
        if self.last_token_s is None:
            self.metrics.ttft.observe(now - self.start_s)
        else:
            self.metrics.itl.observe(now - self.last_token_s)
        self.last_token_s = now

    def done(self, choices: list[_Choice], n: int) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start_s)
        for i, c in enumerate(choices):
            if c.last is None:
                continue
            if i % n == 0:
                self.metrics.prompt_tokens.inc(c.last.num_prompt_tokens)
            self.metrics.generation_tokens.inc(c.last.num_output_tokens)
            if c.last.queue_time_s is not None:
                self.metrics.queue_time.observe(c.last.queue_time_s)


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _check_model(request: Request, model: str) -> None:
    engine = _engine(request)
    if model != engine.model_id:
        raise ModelNotFoundError(f"the model '{model}' does not exist; this server serves '{engine.model_id}'")


def _jobs(prompts: list[list[int]], params: SamplingParams, n: int) -> list[Job]:
    """n choices per prompt; with a seed, choice i uses seed + i so the choices differ yet stay reproducible."""
    jobs = []
    for ids in prompts:
        for i in range(n):
            seeded = params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**63)
            jobs.append((ids, seeded))
    return jobs


async def _events(engine: Engine, jobs: list[Job]) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of every choice, interleaved as they come: (choice index, delta)."""
    if len(jobs) == 1:
        async for delta in engine.generate(*jobs[0]):
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        try:
            async for delta in engine.generate(*job):
                queue.put_nowait((index, delta, None))
        except Exception as e:
            queue.put_nowait((index, None, e))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(jobs)
        while remaining:
            index, delta, error = await queue.get()
            if error is not None:
                raise error
            assert delta is not None
            yield index, delta
            if delta.finish_reason is not None:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await while watching the client: a client that leaves cancels its request, freeing its slot at once."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnectedError()
    finally:
        if not task.done():
            task.cancel()


def _accumulate(choice: _Choice, delta: Delta) -> None:
    choice.text += delta.text
    if delta.logprobs is not None:
        choice.logprobs.append(delta.logprobs)
    choice.last = delta


def _usage(request: Request, choices: list[_Choice], n: int) -> dict[str, Any]:
    firsts = [c.last for i, c in enumerate(choices) if i % n == 0 and c.last is not None]
    prompt = sum(d.num_prompt_tokens for d in firsts)
    completion = sum(c.last.num_output_tokens for c in choices if c.last is not None)
    energy_j = sum(c.last.energy_j or 0.0 for c in choices if c.last is not None)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(d.num_cached_tokens for d in firsts)},
        # Extensions: this request's share of the energy of the steps it ran in, and where it comes from.
        "energy_joules": energy_j,
        "energy_source": _engine(request).energy.source,
        "co2_grams": request.app.state.carbon.grams(energy_j),
    }


def _finish_reason(delta: Delta | None) -> str | None:
    if delta is None or delta.finish_reason is None:
        return None
    return delta.finish_reason.value


def _chat_logprobs(engine: Engine, entries: list[SampledLogprobs]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        raw = engine.model.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [
        {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
    ]}


def _completion_logprobs(engine: Engine, entries: list[SampledLogprobs]) -> dict[str, Any]:
    def text(token_id: int) -> str:
        return engine.model.token_bytes(token_id).decode("utf-8", errors="replace")

    tokens = [text(e.token_id) for e in entries]
    offsets, offset = [], 0
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _Generation:
    """One API request's choices in flight: their accumulated text, usage and client-side timings."""

    def __init__(self, request: Request, jobs: list[Job], n: int) -> None:
        self.request = request
        self.n = n
        self.choices = [_Choice() for _ in jobs]
        self.timing = _Timing(request.app.state.metrics)
        self._events = _events(_engine(request), jobs)
        self._first: tuple[int, Delta] | None = None

    async def start(self) -> _Generation:
        """Wait for the first delta before answering, so that errors (429, 400) still get their status code."""
        self._first = await _unless_disconnected(self.request, anext(self._events))
        return self

    async def deltas(self) -> AsyncIterator[tuple[int, Delta]]:
        """Every (choice index, delta), accumulated into `choices` as it passes."""
        assert self._first is not None, "start() first"
        index, delta = self._first
        while True:
            _accumulate(self.choices[index], delta)
            self.timing.token()
            yield index, delta
            try:
                index, delta = await anext(self._events)
            except StopAsyncIteration:
                break
        self.timing.done(self.choices, self.n)

    async def collect(self) -> list[_Choice]:
        async def drain() -> None:
            async for _ in self.deltas():
                pass

        await _unless_disconnected(self.request, drain())
        return self.choices

    def usage(self) -> dict[str, Any]:
        return _usage(self.request, self.choices, self.n)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    engine = _engine(request)
    return {"object": "list", "data": [{
        "id": engine.model_id,
        "object": "model",
        "created": request.app.state.started_at,
        "owned_by": "qanat",
        "context_length": engine.context_len,
        "max_model_len": engine.context_len,
        "energy_source": engine.energy.source,
    }]}


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    _check_model(request, body.model)
    engine = _engine(request)
    params = body.sampling_params()
    jobs = _jobs([engine.chat_prompt_ids(body.chat_messages())], params, body.n)
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    generation = await _Generation(request, jobs, body.n).start()

    def logprobs_of(entries: list[SampledLogprobs]) -> dict[str, Any] | None:
        return _chat_logprobs(engine, entries) if params.logprobs is not None else None

    if not body.stream:
        choices = await generation.collect()
        return JSONResponse({
            "id": response_id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs_of(c.logprobs),
                "finish_reason": _finish_reason(c.last),
            } for i, c in enumerate(choices)],
            "usage": generation.usage(),
        })

    def chunk(choice_list: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                   "choices": choice_list}
        if body.include_usage:
            payload["usage"] = usage
        return _sse(payload)

    async def stream() -> AsyncIterator[str]:
        for i in range(len(jobs)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for index, delta in generation.deltas():
            if delta.text or delta.logprobs is not None:
                lp = logprobs_of([delta.logprobs]) if delta.logprobs is not None else None
                yield chunk([{"index": index, "delta": {"content": delta.text}, "logprobs": lp,
                              "finish_reason": None}])
            if delta.finish_reason is not None:
                yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": _finish_reason(delta)}])
        if body.include_usage:
            yield chunk([], generation.usage())
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    _check_model(request, body.model)
    if body.echo:
        raise InvalidRequestError("echo is not supported", param="echo")
    engine = _engine(request)
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [engine.tokenize(prompt)]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [engine.tokenize(p) for p in prompt]  # type: ignore[misc]
    params = body.sampling_params()
    jobs = _jobs(prompts, params, body.n)
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    generation = await _Generation(request, jobs, body.n).start()

    def logprobs_of(entries: list[SampledLogprobs]) -> dict[str, Any] | None:
        return _completion_logprobs(engine, entries) if params.logprobs is not None else None

    if not body.stream:
        choices = await generation.collect()
        return JSONResponse({
            "id": response_id, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": i, "text": c.text, "logprobs": logprobs_of(c.logprobs),
                         "finish_reason": _finish_reason(c.last)} for i, c in enumerate(choices)],
            "usage": generation.usage(),
        })

    def chunk(index: int, delta: Delta) -> str:
        lp = logprobs_of([delta.logprobs]) if delta.logprobs is not None else None
        payload: dict[str, Any] = {
            "id": response_id, "object": "text_completion", "created": created, "model": body.model,
            "choices": [{"index": index, "text": delta.text, "logprobs": lp,
                         "finish_reason": _finish_reason(delta)}],
        }
        if body.include_usage:
            payload["usage"] = None
        return _sse(payload)

    async def stream() -> AsyncIterator[str]:
        async for index, delta in generation.deltas():
            if delta.text or delta.finish_reason is not None or delta.logprobs is not None:
                yield chunk(index, delta)
        if body.include_usage:
            yield _sse({"id": response_id, "object": "text_completion", "created": created, "model": body.model,
                        "choices": [], "usage": generation.usage()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")
