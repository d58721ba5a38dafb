"""A request's path through the serving layer, the same for every endpoint:

    validate -> guard (input) -> tools -> render -> admit -> generate -> guard (output) -> format

`validate` turns the body into SamplingParams and prompts (pydantic did the types; LIMITS the ranges);
`guard` (qanat/guard/) runs the input rails on every message and text prompt before anything is rendered: a
block is a 400 with code "content_filter" and the engine never sees the request; the output rails sit between
the engine's deltas and the choices, holding back only what a match could still grow into;
`tools` (tools.py) checks tools and tool messages, writes them into the prompt and, when a call is forced,
constrains the output with a grammar; its parser later splits each choice's output into text and tool calls;
`render` applies the chat template and tokenizes, off the event loop (EngineClient.render); `admit` finds the
engine for the model and waits for the first delta, so that refusals (400, 429, 503) keep their status codes;
`generate` gathers the choices' deltas; `format` writes OpenAI's JSON or SSE through an endpoint's
ResponseFormat. A new capability (guardrails, routing) is a new step here, not a branch in each handler.
(A streamed request to a model served only by plain OpenAI-compatible upstreams, with no tools and no guardrails,
never gets here: relay.py answers it below FastAPI with the upstream's bytes, after the same validation.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from qanat.engine.client import ChatPrompt, Delta, EngineClient, Prompt, RequestHints, TextPrompt
from qanat.engine.errors import InvalidRequestError
from qanat.engine.sampling import SamplingParams
from qanat.guard.rails import Guard, OutputRail
from qanat.serving.errors import ClientDisconnectedError, ModelNotFoundError, error_body
from qanat.serving.formats import Choice, ChoiceDelta, Extras, ResponseFormat
from qanat.serving.metrics import ServerMetrics
from qanat.serving.protocol import ChatCompletionRequest, CompletionRequest
from qanat.serving.state import AppState, app_state
from qanat.serving.tools import ToolPlan, plan_tools

log = logging.getLogger("qanat.server")
T = TypeVar("T")

Body = ChatCompletionRequest | CompletionRequest
Job = tuple[Prompt, SamplingParams]  # one choice: its rendered prompt and sampling params


async def handle(body: Body, fmt: ResponseFormat, http: Request) -> Response:
    state = app_state(http)
    with _prompt_param(fmt):
        engine = admit_model(state, body.model)
        params, prompts = body.sampling_params(), body.prompts()
        prompts = await guard_input(state.guard, prompts, fmt.prompt_param)
        if state.guard is not None and state.guard.output_acts and (params.logprobs is not None
                                                                     or body.return_token_ids):
            # Log-probabilities and token ids would carry the very text the output rails redact or block.
            raise InvalidRequestError("logprobs and return_token_ids are not available while the output "
                                      "guardrails redact or block", param="logprobs")
        tools = plan_tools(body, engine.card)
        hints = RequestHints(session=http.headers.get("x-session-id") or body.user, user=body.user)
        if tools is not None:
            params, prompts = tools.apply(params, prompts)
        rendered = await render(engine, prompts)
        jobs = fan_out(rendered, params, body.n)
        generation = await Generation(http, engine, jobs, body.n, state, hints, tools).start()
    response_id, created = f"{fmt.id_prefix}-{uuid.uuid4().hex}", int(time.time())
    head = {"id": response_id, "object": fmt.object, "created": created, "model": body.model}
    extras = Extras(logprobs=params.logprobs is not None, token_ids=body.return_token_ids)
    headers = {"x-qanat-replica": generation.replica}
    if not body.stream:
        choices = await generation.collect()
        return JSONResponse({**head, "choices": [fmt.choice(i, c, extras) for i, c in enumerate(choices)],
                             "usage": generation.usage()}, headers=headers)
    head["object"] = fmt.chunk_object
    return StreamingResponse(_sse(generation, fmt, head, extras, body.include_usage),
                             media_type="text/event-stream", headers=headers)


@contextlib.contextmanager
def _prompt_param(fmt: ResponseFormat) -> Iterator[None]:
    """The engine names the prompt "prompt"; a chat client sent "messages"."""
    try:
        yield
    except InvalidRequestError as e:
        if e.param == "prompt":
            raise InvalidRequestError(str(e), param=fmt.prompt_param) from e
        raise


# -- steps ------------------------------------------------------------------------------------------------


def admit_model(state: AppState, model: str) -> EngineClient:
    engine = state.models.get(model)
    if engine is None:
        served = ", ".join(f"'{name}'" for name in state.models.names)
        raise ModelNotFoundError(f"the model '{model}' does not exist; this server serves {served}")
    return engine


_GUARD_INLINE_CHARS = 16_384  # longer prompts are scanned in a worker thread (about 1 ms per KB)


async def guard_input(guard: Guard | None, prompts: list[Prompt], param: str) -> list[Prompt]:
    """Input rails on every message of a chat and on text prompts (token prompts carry no text to check):
    the prompts the engine may see, redacted where the policy says so, or ContentFilterError."""
    if guard is None:
        return prompts
    if sum(_text_size(p) for p in prompts) > _GUARD_INLINE_CHARS:
        return await asyncio.to_thread(_guard_prompts, guard, prompts, param)
    return _guard_prompts(guard, prompts, param)


def _text_size(prompt: Prompt) -> int:
    if isinstance(prompt, TextPrompt):
        return len(prompt.text)
    if isinstance(prompt, ChatPrompt):
        return sum(len(m["content"]) for m in prompt.messages if isinstance(m.get("content"), str))
    return 0


def _guard_prompts(guard: Guard, prompts: list[Prompt], param: str) -> list[Prompt]:
    guarded: list[Prompt] = []
    for prompt in prompts:
        if isinstance(prompt, ChatPrompt):
            messages = tuple({**m, "content": guard.check_input(m["content"], param)}
                             if isinstance(m.get("content"), str) and m["content"] else m for m in prompt.messages)
            guarded.append(replace(prompt, messages=messages))
        elif isinstance(prompt, TextPrompt):
            guarded.append(TextPrompt(guard.check_input(prompt.text, param)))
        else:
            guarded.append(prompt)
    return guarded


async def render(engine: EngineClient, prompts: list[Prompt]) -> list[Prompt]:
    return list(await asyncio.gather(*(engine.render(p) for p in prompts)))


def fan_out(prompts: list[Prompt], params: SamplingParams, n: int) -> list[Job]:
    """n choices per prompt; with a seed, choice i uses seed + i so the choices differ yet stay reproducible."""
    jobs = []
    for prompt in prompts:
        for i in range(n):
            seeded = params if params.seed is None or i == 0 else replace(params, seed=(params.seed + i) % 2**63)
            jobs.append((prompt, seeded))
    return jobs


# -- generation -------------------------------------------------------------------------------------------


@dataclass
class _Timing:
    """Per-request latencies as the client sees them, per choice, fed to the Prometheus histograms."""

    metrics: ServerMetrics
    start_s: float = field(default_factory=time.perf_counter)
    last_token_s: dict[int, float] = field(default_factory=dict)  # choice index -> its last token's time

    def token(self, index: int, num_tokens: int) -> None:
        # Counted as they stream, not when the request ends: rates stay live, and a stopped reply's tokens count.
        self.metrics.generation_tokens.inc(num_tokens)
        now = time.perf_counter()
        last = self.last_token_s.get(index)
        if last is None:
            self.metrics.ttft.observe(now - self.start_s)
        else:
            self.metrics.itl.observe(now - last)
        self.last_token_s[index] = now

    def done(self, choices: list[Choice], n: int) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.start_s)
        for i, c in enumerate(choices):
            if c.last is None:
                continue
            if i % n == 0:
                self.metrics.prompt_tokens.inc(c.last.num_prompt_tokens)
            if c.last.queue_time_s is not None:
                self.metrics.queue_time.observe(c.last.queue_time_s)
            if c.tools is not None:
                self.metrics.tool_calls.labels(c.tools.mode).inc(len(c.tools.calls))
                self.metrics.tool_call_failures.labels(c.tools.mode).inc(int(c.tools.malformed))


class Generation:
    """One API request's choices in flight: their accumulated output, usage and client-side timings."""

    def __init__(self, http: Request, engine: EngineClient, jobs: list[Job], n: int, state: AppState,
                 hints: RequestHints | None = None, tools: ToolPlan | None = None) -> None:
        self.http = http
        self.engine = engine
        self.n = n
        self.state = state
        self.choices = [Choice(tools=tools.parser() if tools is not None else None) for _ in jobs]
        guard = state.guard
        self.rails: list[OutputRail] | None = [guard.output_rail() for _ in jobs] \
            if guard is not None and guard.output_acts else None
        self.timing = _Timing(state.metrics)
        self._events = _interleave(engine, jobs, hints)
        self._first: tuple[int, Delta] | None = None

    async def start(self) -> Generation:
        """Wait for the first delta before answering, so that errors (400, 429, 503) keep their status code."""
        self._first = await _unless_disconnected(self.http, anext(self._events))
        return self

    @property
    def replica(self) -> str:
        """Which replica answers (for x-qanat-replica): the router's choice, or "local" for a lone engine."""
        assert self._first is not None, "start() first"
        return self._first[1].replica or "local"

    async def deltas(self) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """Every (choice index, what its delta adds), accumulated into `choices` as it passes."""
        assert self._first is not None, "start() first"
        index, delta = self._first
        while True:
            choice = self.choices[index]
            if not choice.filtered:  # a blocked choice's later deltas are dropped
                if self.rails is not None:
                    delta = self._guard_output(index, delta)
                update = choice.add(delta)
                self.timing.token(index, len(delta.token_ids))
                yield index, update
            if any(c.filtered for c in self.choices) and all(
                    c.filtered or (c.last is not None and c.last.finish_reason is not None) for c in self.choices):
                await self._events.aclose()  # the engine stops generating what nobody will see
                break
            try:
                index, delta = await anext(self._events)
            except StopAsyncIteration:
                break
        self.timing.done(self.choices, self.n)

    def _guard_output(self, index: int, delta: Delta) -> Delta:
        assert self.rails is not None
        rail = self.rails[index]
        text = rail.feed(delta.text)
        if delta.finish_reason is not None:
            text += rail.finish()
        if rail.blocked is not None:
            self.choices[index].filtered = True
        return replace(delta, text=text)

    async def collect(self) -> list[Choice]:
        async def drain() -> None:
            async for _ in self.deltas():
                pass

        await _unless_disconnected(self.http, drain())
        return self.choices

    def usage(self) -> dict[str, Any]:
        lasts = [c.last for c in self.choices if c.last is not None]
        firsts = [c.last for i, c in enumerate(self.choices) if i % self.n == 0 and c.last is not None]
        prompt = sum(d.num_prompt_tokens for d in firsts)
        completion = sum(d.num_output_tokens for d in lasts)
        energy_j = sum(d.energy_j or 0.0 for d in lasts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(d.num_cached_tokens for d in firsts)},
            # Extensions: this request's share of the energy of the steps it ran in, and where it comes from.
            "energy_joules": energy_j,
            "energy_source": self.engine.card.energy_source,
            "co2_grams": self.state.config.carbon.grams(energy_j),
        }


async def _interleave(engine: EngineClient, jobs: list[Job], hints: RequestHints | None
                      ) -> AsyncGenerator[tuple[int, Delta], None]:
    """Deltas of every choice, interleaved as they come: (choice index, delta)."""
    if len(jobs) == 1:
        async for delta in engine.generate(*jobs[0], hints=hints):
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        try:
            async for delta in engine.generate(*job, hints=hints):
                queue.put_nowait((index, delta, None))
        except Exception as e:
            queue.put_nowait((index, None, e))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(jobs)
        while remaining:
            index, maybe_delta, error = await queue.get()
            if error is not None:
                raise error
            assert maybe_delta is not None
            yield index, maybe_delta
            if maybe_delta.finish_reason is not None:
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()


async def _unless_disconnected(http: Request, awaitable: Awaitable[T]) -> T:
    """Await while watching the client: a client that leaves cancels its request, freeing its slot at once."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await http.is_disconnected():
                raise ClientDisconnectedError()
    finally:
        if not task.done():
            task.cancel()


# -- format: SSE ------------------------------------------------------------------------------------------


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(generation: Generation, fmt: ResponseFormat, head: dict[str, Any], extras: Extras,
               include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload = {**head, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return sse_event(payload)

    for i in range(len(generation.choices)):
        for entry in fmt.opening(i):
            yield chunk([entry])
    try:
        async for index, update in generation.deltas():
            for entry in fmt.delta_choices(index, update, extras):
                yield chunk([entry])
    except Exception as e:
        # The status line is long gone: the error travels as an event, in OpenAI's error shape, and the stream
        # still ends as streams end, so clients never mistake a cut for a finished answer.
        if not isinstance(e, InvalidRequestError):
            log.warning("stream failed after its first token: %s", e)
        yield sse_event(error_body(e))
        yield "data: [DONE]\n\n"
        return
    if include_usage:
        yield chunk([], generation.usage())
    yield "data: [DONE]\n\n"
