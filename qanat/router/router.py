"""ModelRouter: one model's replicas behind one EngineClient — choose, balance, fail over.

- A policy (`policies.py`) picks among the replicas that are available: not ejected, passing their active
  health probe, and ready (a local engine whose executor is restarting, or draining, is not).
- A failure before the first token (5xx, reset, timeout, a dead executor, a full queue) is retried on another
  replica, `max_retries` times, with a short backoff. A client error (400, an upstream 4xx) is passed through.
- A stream whose replica dies midway continues on another Qanat replica (local, or a `qanat serve` upstream):
  the prompt is prefilled there and the tokens already sent are replayed as its output (decoded one by one,
  as they were first computed, and not sent again), and the stream goes on under the same response, with no
  token sent twice or lost. Other upstreams cannot take token ids, so there the stream ends with an
  error event.
- `fail_after` consecutive failures eject a replica for `cooldown_s`; then it gets traffic again.
- When no replica of the model is available, the model's fallbacks serve the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from qanat.energy.accounting import EnergyTotals
from qanat.engine.client import (
    Delta,
    EngineClient,
    EngineHealth,
    EngineLoad,
    EngineStats,
    ModelCard,
    Prompt,
    RelayedStream,
    RequestHints,
    TokenPrompt,
    merge_prompt_cache_stats,
)
from qanat.engine.errors import EngineUnavailableError, QueueFullError, RequestFailedError
from qanat.engine.remote import RemoteEngine
from qanat.engine.sampling import SamplingParams
from qanat.router.metrics import RouterMetrics
from qanat.router.policies import Policy, ReplicaView, RouteRequest

log = logging.getLogger("qanat.router")

RETRY_BACKOFF_S = 0.05  # doubled at each retry
PROBE_INTERVAL_S = 5.0


@dataclass
class Replica:
    view: ReplicaView
    engine: EngineClient
    health_url: str | None = None  # remote replicas: probed every PROBE_INTERVAL_S
    fail_after: int = 3
    cooldown_s: float = 10.0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    probe_ok: bool = True

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def continuable(self) -> bool:
        """A Qanat engine: it takes a prompt as token ids and streams the ids it samples."""
        return not isinstance(self.engine, RemoteEngine) or self.engine.is_qanat

    def state(self, now: float) -> str:
        if now < self.ejected_until:
            return "ejected"
        if not self.probe_ok:
            return "unreachable"
        health = self.engine.health()
        return "ready" if health.ready else f"not ready: {health.detail}"

    def failed(self, now: float) -> None:
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.fail_after:
            self.ejected_until = now + self.cooldown_s
            self.consecutive_failures = 0
            log.warning("replica %s ejected for %.0f s after %d failures", self.name, self.cooldown_s, self.fail_after)

    def succeeded(self) -> None:
        self.consecutive_failures = 0

    def take(self, max_tokens: int) -> None:
        """A request goes to this replica: it counts as outstanding until `release`."""
        self.view.outstanding += 1
        self.view.outstanding_tokens += max_tokens

    def release(self, max_tokens: int) -> None:
        self.view.outstanding -= 1
        self.view.outstanding_tokens -= max_tokens


@dataclass
class _Attempts:
    """One request's tries before its first token: where, how many failed, and whether every one was only full."""

    tried: set[str] = field(default_factory=set)
    failures: int = 0
    all_full: bool = True

    @property
    def only_full(self) -> bool:
        """Every replica tried was at capacity: the client should retry later (429), not see a failure."""
        return bool(self.tried) and self.all_full


_RETRYABLE = (EngineUnavailableError, RequestFailedError, QueueFullError)


class ModelRouter:
    def __init__(self, name: str, replicas: list[Replica], policy: Policy, metrics: RouterMetrics,
                 max_retries: int = 2) -> None:
        self.name = name
        self.replicas = replicas
        self.policy = policy
        self.metrics = metrics
        self.max_retries = max_retries
        self.fallbacks: list[ModelRouter] = []  # set once every model is built
        self._probe_task: asyncio.Task[None] | None = None

    # -- lifecycle (on the serving event loop) -------------------------------------------------------------

    async def start(self) -> None:
        for replica in self.replicas:
            if isinstance(replica.engine, RemoteEngine):
                try:
                    await replica.engine.connect()
                except Exception as e:  # down at start: probes bring it back when it answers
                    replica.probe_ok = False
                    log.warning("replica %s: %s", replica.name, e)
        self._probe_task = asyncio.create_task(self._probe_forever())

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        for replica in self.replicas:
            if isinstance(replica.engine, RemoteEngine):
                await replica.engine.aclose()

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            await self.probe_once()

    async def probe_once(self) -> None:
        for replica in self.replicas:
            engine = replica.engine
            if replica.health_url is None or not isinstance(engine, RemoteEngine):
                continue
            ok = await engine.probe(replica.health_url)
            if ok and not replica.probe_ok:
                with contextlib.suppress(Exception):
                    await engine.connect()  # it may have come back as another server
                log.info("replica %s answers its health probe again", replica.name)
            replica.probe_ok = ok

    # -- EngineClient --------------------------------------------------------------------------------------

    @property
    def card(self) -> ModelCard:
        cards = [r.engine.card for r in self.replicas]
        sources = sorted({c.energy_source for c in cards})
        return ModelCard(
            id=self.name, context_length=min((c.context_length for c in cards if c.context_length), default=0),
            owned_by="qanat", chip="; ".join(f"{r.name}: {c.chip}" for r, c in zip(self.replicas, cards, strict=True)),
            energy_source=sources[0] if len(sources) == 1 else "mixed", has_chat_template=True,
            # Native tool calls only when every replica speaks the same format; else the generic one.
            tool_call_format=formats.pop() if len(formats := {c.tool_call_format for c in cards}) == 1 else None,
        )

    async def render(self, prompt: Prompt) -> Prompt:
        return prompt  # each replica renders for itself once chosen: a remote one may take the messages as they are

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                       hints: RequestHints | None = None) -> AsyncIterator[Delta]:
        entered_s = time.perf_counter()
        route = RouteRequest(prompt, params.max_tokens or 0, hints.session if hints else None)
        attempts = _Attempts()
        sent: list[int] = []  # token ids already streamed to the client
        prompt_ids: tuple[int, ...] | None = None  # the first replica's rendered prompt, for a continuation
        first: Delta | None = None
        continued_after: int | None = None  # tokens already sent when the replica now streaming took over
        while True:
            replica = self._choose(route, attempts.tried, continuation=first is not None)
            if replica is None:
                if first is None and attempts.only_full:
                    raise QueueFullError(f"model {self.name}: every replica is at capacity")
                if first is None and self.fallbacks:
                    async for delta in self._fallback(prompt, params, request_id, hints):
                        yield delta
                    return
                raise EngineUnavailableError(self._unavailable_message(first is not None))
            attempts.tried.add(replica.name)
            self.metrics.overhead_for(self.name).observe(time.perf_counter() - entered_s)
            target: Prompt = prompt if first is None else TokenPrompt(prompt_ids or (), tuple(sent))
            replica.take(route.max_tokens)
            started_s = time.perf_counter()
            try:
                rendered = await replica.engine.render(target)
                if first is None and isinstance(rendered, TokenPrompt):
                    prompt_ids = rendered.token_ids
                async for delta in replica.engine.generate(rendered, params, request_id, hints):
                    if continued_after is not None and first is not None and delta.finish_reason is not None:
                        delta = replace(delta, num_cached_tokens=first.num_cached_tokens)
                    first = first or delta
                    sent.extend(delta.token_ids)
                    yield replace(delta, replica=replica.name)
                    if delta.finish_reason is not None:
                        self._book(replica, delta, "ok" if continued_after is None else "continued", started_s)
                        replica.succeeded()
                return
            except _RETRYABLE as e:
                if first is None:
                    await self._retry_before_first(attempts, replica, e)
                    continue
                self._book_failure(replica, e)
                if not (replica.continuable and prompt_ids is not None):
                    raise  # the client has tokens from an upstream that cannot be continued elsewhere
                continued_after = len(sent)
                log.warning("replica %s failed mid-stream (%s); continuing after %d tokens", replica.name, e, len(sent))
            finally:
                replica.release(route.max_tokens)

    def _book_failure(self, replica: Replica, error: Exception) -> bool:
        """Count a replica's failure (a full queue is not one); returns whether it was only full."""
        full = isinstance(error, QueueFullError)
        if not full:
            replica.failed(time.monotonic())
        self.metrics.requests_for(self.name, replica.name, "full" if full else "failed").inc()
        return full

    async def _retry_before_first(self, attempts: _Attempts, replica: Replica, error: Exception) -> None:
        """Book a failure before the first token, then wait the backoff; re-raises `error` once the retries are
        spent. A full replica is no failure: the next one is tried at once."""
        full = self._book_failure(replica, error)
        attempts.all_full = attempts.all_full and full
        if not full:
            attempts.failures += 1
            if attempts.failures > self.max_retries:
                raise error
            await asyncio.sleep(RETRY_BACKOFF_S * 2 ** (attempts.failures - 1))

    # -- byte relay (plain upstreams) ------------------------------------------------------------------------

    def can_relay(self) -> bool:
        """Every replica is a plain OpenAI-compatible upstream: its answer can pass through as bytes. Qanat
        replicas are parsed (a continuation needs the token ids they stream), and so is a model with fallbacks
        (another model answers under this one's name)."""
        return not self.fallbacks and all(
            isinstance(r.engine, RemoteEngine) and not r.engine.is_qanat for r in self.replicas)

    async def relay(self, path: str, body: dict[str, Any], prompt: Prompt, hints: RequestHints) -> RelayedStream:
        """Choose a replica as `generate` does, retrying failures before the first bytes; then stream its bytes."""
        entered_s = time.perf_counter()
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 0)
        route = RouteRequest(prompt, max_tokens, hints.session)
        attempts = _Attempts()
        while True:
            replica = self._choose(route, attempts.tried, continuation=False)
            if replica is None:
                if attempts.only_full:
                    raise QueueFullError(f"model {self.name}: every replica is at capacity")
                raise EngineUnavailableError(self._unavailable_message(False))
            attempts.tried.add(replica.name)
            self.metrics.overhead_for(self.name).observe(time.perf_counter() - entered_s)
            engine = replica.engine
            assert isinstance(engine, RemoteEngine)
            replica.take(max_tokens)
            started_s = time.perf_counter()
            chunks = engine.relay(path, body)
            try:
                first = await anext(chunks)
            except BaseException as e:
                replica.release(max_tokens)
                await chunks.aclose()
                if not isinstance(e, _RETRYABLE):
                    raise
                await self._retry_before_first(attempts, replica, e)
                continue
            return RelayedStream(replica.name, self._relayed(replica, max_tokens, first, chunks, started_s))

    async def _relayed(self, replica: Replica, max_tokens: int, first: bytes, chunks: AsyncGenerator[bytes, None],
                       started_s: float) -> AsyncGenerator[bytes, None]:
        try:
            yield first
            async for data in chunks:
                yield data
        except _RETRYABLE as e:
            self._book_failure(replica, e)
            raise
        else:
            self.metrics.requests_for(self.name, replica.name, "ok").inc()
            self.metrics.latency_for(self.name, replica.name).observe(time.perf_counter() - started_s)
            replica.succeeded()
        finally:
            replica.release(max_tokens)
            await chunks.aclose()

    def _choose(self, route: RouteRequest, tried: set[str], continuation: bool) -> Replica | None:
        now = time.monotonic()
        available = [r for r in self.replicas if r.name not in tried and r.state(now) == "ready"
                     and (r.continuable or not continuation)]
        if not available:
            return None
        by_name = {r.name: r for r in available}
        return by_name[self.policy.choose([r.view for r in available], route).name]

    async def _fallback(self, prompt: Prompt, params: SamplingParams, request_id: str | None,
                        hints: RequestHints | None) -> AsyncIterator[Delta]:
        for fallback in self.fallbacks:
            if fallback.health().ready:
                log.info("model %s has no replica available; %s serves the request", self.name, fallback.name)
                async for delta in fallback.generate(prompt, params, request_id, hints):
                    yield delta
                return
        raise EngineUnavailableError(self._unavailable_message(False))

    def _unavailable_message(self, mid_stream: bool) -> str:
        now = time.monotonic()
        states = ", ".join(f"{r.name}: {r.state(now)}" for r in self.replicas)
        what = "no other Qanat replica can continue the stream" if mid_stream else "no replica is available"
        return f"model {self.name}: {what} ({states})"

    def _book(self, replica: Replica, final: Delta, outcome: str, started_s: float) -> None:
        self.metrics.requests_for(self.name, replica.name, outcome).inc()
        self.metrics.latency_for(self.name, replica.name).observe(time.perf_counter() - started_s)
        if final.energy_j:
            replica.view.joules += final.energy_j
            replica.view.tokens += final.num_prompt_tokens + final.num_output_tokens

    async def abort(self, request_id: str) -> None:
        """Leaving `generate`'s stream aborts the request on the replica serving it."""

    async def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return await self._any_replica().tokenize(text, add_special)

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        return await self._any_replica().detokenize(token_ids)

    async def apply_chat_template(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return await self._any_replica().apply_chat_template(messages)

    def _any_replica(self) -> EngineClient:
        now = time.monotonic()
        ready = [r for r in self.replicas if r.state(now) == "ready" and r.continuable]
        if not ready:
            raise EngineUnavailableError(self._unavailable_message(False))
        return ready[0].engine

    def health(self) -> EngineHealth:
        now = time.monotonic()
        states = [r.state(now) for r in self.replicas]
        ready = sum(s == "ready" for s in states)
        return EngineHealth(ready=ready > 0 or any(f.health().ready for f in self.fallbacks),
                            detail=f"{ready} of {len(states)} replicas ready",
                            restarts=sum(r.engine.health().restarts for r in self.replicas))

    def replica_states(self) -> list[dict[str, Any]]:
        """For /v1/models: each replica's name, kind and state."""
        now = time.monotonic()
        return [{"name": r.name, "kind": "remote" if isinstance(r.engine, RemoteEngine) else "local",
                 "qanat": r.continuable, "state": r.state(now), "outstanding": r.view.outstanding,
                 "joules_per_token": r.view.joules_per_token, "executor_pid": r.engine.health().executor_pid}
                for r in self.replicas]

    def load(self) -> EngineLoad:
        loads = [r.engine.load() for r in self.replicas]
        return EngineLoad(sum(x.num_running for x in loads), sum(x.num_waiting for x in loads),
                          sum(x.kv_usage for x in loads) / len(loads))

    def stats(self) -> EngineStats:
        parts = [r.engine.stats() for r in self.replicas]
        sources = sorted({p.energy.source for p in parts})
        energy = EnergyTotals(sources[0] if len(sources) == 1 else "mixed",
                              sum(p.energy.total_j for p in parts), sum(p.energy.attributed_j for p in parts),
                              sum(p.energy.idle_j for p in parts), sum(p.energy.tokens for p in parts))
        return EngineStats(
            load=self.load(), prefix_cache_hit_tokens=sum(p.prefix_cache_hit_tokens for p in parts),
            prompt_tokens=sum(p.prompt_tokens for p in parts), energy=energy,
            executor_restarts=sum(p.executor_restarts for p in parts), steps=sum(p.steps for p in parts),
            step_s=sum(p.step_s for p in parts), boundary_s=sum(p.boundary_s for p in parts),
            prompt_cache=merge_prompt_cache_stats([p.prompt_cache for p in parts]),
            spec_drafts=sum(p.spec_drafts for p in parts), spec_draft_tokens=sum(p.spec_draft_tokens for p in parts),
            spec_accepted_tokens=sum(p.spec_accepted_tokens for p in parts),
        )

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.engine.shutdown()



