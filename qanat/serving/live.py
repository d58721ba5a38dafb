"""Live samples: once a second, what /metrics says, kept for the last minutes and served as JSON.

A sample is computed from the same objects /metrics reads (ServerMetrics' counters and histograms, and the model
registry's `stats()`), so each figure is what a Prometheus query over /metrics would give: rates over the last
`rate_window_s` (`rate(x[5s])`: one engine step can take longer than a second, so a 1 s rate would flicker),
quantiles Prometheus's `histogram_quantile` over the last `window_s` of bucket counts. Where a router serves a
model, each replica gets its own figures too: its engine's stats (the parts the router adds up for /metrics) and its
`qanat_router_requests_total` series. A figure that does not exist (no request started in the window, no engine step
read the energy meter, no meter at all, a remote replica's queue) is None, JSON null: never a made-up zero.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from fastapi import APIRouter, Query
from prometheus_client import Counter, Histogram
from prometheus_client.samples import Sample

from qanat.engine.client import EngineClient, EngineStats
from qanat.engine.remote import RemoteEngine
from qanat.router.router import ModelRouter
from qanat.serving.metrics import ServerMetrics

log = logging.getLogger("qanat.server")

Buckets = tuple[tuple[float, float], ...]  # (upper bound "le", cumulative count), the last bound +inf
UNMETERED = ("", "none", "unknown")  # energy sources that mean: no meter, so no energy figures
_SERVED = ("ok", "continued")  # router outcomes of a request a replica finished
_FAILED = ("failed", "full")


class Models(Protocol):
    """What the sampler reads: the server's ModelRegistry, the object /metrics reads too."""

    def stats(self) -> EngineStats: ...

    def __iter__(self) -> Iterator[EngineClient]: ...


@dataclass(frozen=True)
class ReplicaSample:
    model: str
    replica: str
    kind: str  # local | remote
    state: str  # ready | ejected | unreachable | not ready: why
    requests_running: int  # a remote replica: requests this router has in flight there
    requests_waiting: int | None  # None for a remote replica: its queue is not visible from here
    kv_cache_usage: float | None  # None for a remote replica
    tokens_per_s: float  # tokens its engine processed (prompt + output), rate
    requests_per_s: float  # qanat_router_requests_total{outcome=~"ok|continued"}, rate
    failures_per_s: float  # qanat_router_requests_total{outcome=~"failed|full"}, rate
    power_w: float | None  # as LiveSample's, for this replica's engine
    joules_per_token: float | None


@dataclass(frozen=True)
class LiveSample:
    seq: int  # increasing; clients ask for samples after the last one they hold
    t: float  # unix time, seconds
    generation_tokens_per_s: float  # qanat_generation_tokens_total, rate over the rate window
    prompt_tokens_per_s: float  # qanat_prefix_cache_query_tokens_total (prompt tokens admitted), rate
    ttft_p50_s: float | None  # histogram_quantile over the window; None when no request started in it
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    requests_running: int  # qanat_num_requests_running
    requests_waiting: int  # qanat_num_requests_waiting
    kv_cache_usage: float  # qanat_kv_cache_usage_ratio, 0..1
    prefix_cache_hit_ratio: float | None  # hit / query tokens over the window; None when no prompt came
    power_w: float | None  # joules charged to requests over the rate window / its length; None when no step ran
    joules_per_token: float | None  # over the rate window: 1 / qanat_tokens_per_joule; None when no token ran
    replicas: tuple[ReplicaSample, ...] = ()  # models served by a router: one per replica


@dataclass(frozen=True)
class _Reading:
    """Cumulative counters at one instant."""

    mono_s: float
    generation_tokens: float
    prompt_tokens: int
    prefix_hit_tokens: int
    steps: int
    attributed_j: float
    energy_tokens: int
    ttft: Buckets
    itl: Buckets


@dataclass(frozen=True)
class _ReplicaReading:
    mono_s: float
    tokens: int
    attributed_j: float
    steps: int
    served: float
    failed: float


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """Prometheus's histogram_quantile: linear inside the bucket where rank q falls; the highest finite bound
    when it falls in +Inf. None for an empty histogram."""
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _samples(metric: Counter | Histogram, suffix: str) -> list[Sample]:
    return [s for family in metric.collect() for s in family.samples if s.name.endswith(suffix)]


def _buckets(histogram: Histogram) -> Buckets:
    return tuple((float(s.labels["le"]), float(s.value)) for s in _samples(histogram, "_bucket"))


def _since(now: Buckets, before: Buckets) -> Buckets:
    return tuple((bound, count - old) for (bound, count), (_, old) in zip(now, before, strict=True))


def _total(counter: Counter) -> float:
    return float(_samples(counter, "_total")[0].value)


def _energy_rates(stats: EngineStats, steps: int, tokens: int, attributed_j: float, dt: float
                  ) -> tuple[float | None, float | None]:
    """Power and joules per token over an interval; None where the meter was not read (no step ran) or is none."""
    if stats.energy.source in UNMETERED:
        return None, None
    # The meter is read around engine steps only: with none in the interval there is no reading.
    return (attributed_j / dt if steps else None), (attributed_j / tokens if tokens else None)


class LiveSampler:
    """A ring buffer of `capacity` samples, one per `interval_s`. `tick` takes one; `run` ticks forever."""

    def __init__(self, models: Models, metrics: ServerMetrics, capacity: int = 300, interval_s: float = 1.0,
                 window_s: float = 10.0, rate_window_s: float = 5.0) -> None:
        self.models = models
        self.metrics = metrics
        self.energy_source = ""
        self.interval_s = interval_s
        self.window_s = window_s
        self.rate_window_s = rate_window_s
        self._rate_steps = max(1, round(rate_window_s / interval_s))  # readings back to the rate window's start
        self.samples: deque[LiveSample] = deque(maxlen=capacity)
        # Readings over the longer window: [0] opens the quantile window, [-1] is now.
        self._readings: deque[_Reading] = deque(maxlen=max(round(window_s / interval_s), self._rate_steps) + 1)
        self._seq = 0
        self._replicas: dict[tuple[str, str], deque[_ReplicaReading]] = {}

    def _read(self, mono_s: float, stats: EngineStats) -> _Reading:
        return _Reading(
            mono_s=mono_s, generation_tokens=_total(self.metrics.generation_tokens),
            prompt_tokens=stats.prompt_tokens, prefix_hit_tokens=stats.prefix_cache_hit_tokens, steps=stats.steps,
            attributed_j=stats.energy.attributed_j, energy_tokens=stats.energy.tokens,
            ttft=_buckets(self.metrics.ttft), itl=_buckets(self.metrics.itl),
        )

    def tick(self, mono_s: float | None = None, wall_s: float | None = None) -> LiveSample | None:
        """Read the counters now; from the second reading on, append and return a sample."""
        stats = self.models.stats()
        self.energy_source = stats.energy.source
        now = self._read(time.monotonic() if mono_s is None else mono_s, stats)
        self._readings.append(now)
        replicas = self._replica_samples(now.mono_s)
        if len(self._readings) < 2:
            return None
        last = self._readings[max(0, len(self._readings) - 1 - self._rate_steps)]  # opens the rate window
        window = self._readings[-min(len(self._readings), round(self.window_s / self.interval_s) + 1)]
        dt = now.mono_s - last.mono_s
        if dt <= 0:
            return None
        ttft, itl = _since(now.ttft, window.ttft), _since(now.itl, window.itl)
        power_w, joules_per_token = _energy_rates(stats, now.steps - last.steps, now.energy_tokens - last.energy_tokens,
                                                  now.attributed_j - last.attributed_j, dt)
        queried = now.prompt_tokens - window.prompt_tokens
        self._seq += 1
        sample = LiveSample(
            seq=self._seq, t=round(time.time() if wall_s is None else wall_s, 3),
            generation_tokens_per_s=(now.generation_tokens - last.generation_tokens) / dt,
            prompt_tokens_per_s=(now.prompt_tokens - last.prompt_tokens) / dt,
            ttft_p50_s=histogram_quantile(0.5, ttft), ttft_p99_s=histogram_quantile(0.99, ttft),
            itl_p50_s=histogram_quantile(0.5, itl), itl_p99_s=histogram_quantile(0.99, itl),
            requests_running=stats.load.num_running, requests_waiting=stats.load.num_waiting,
            kv_cache_usage=stats.load.kv_usage,
            prefix_cache_hit_ratio=(now.prefix_hit_tokens - window.prefix_hit_tokens) / queried if queried else None,
            power_w=power_w, joules_per_token=joules_per_token, replicas=replicas,
        )
        self.samples.append(sample)
        return sample

    def _replica_samples(self, mono_s: float) -> tuple[ReplicaSample, ...]:
        """Each router's replicas, from their engines' stats and the router's request counter."""
        out = []
        for engine in self.models:
            if not isinstance(engine, ModelRouter):
                continue
            outcomes = {(s.labels["replica"], s.labels["outcome"]): s.value
                        for s in _samples(engine.metrics.requests, "_total") if s.labels["model"] == engine.name}
            for replica in engine.replicas:
                stats = replica.engine.stats()
                now = _ReplicaReading(
                    mono_s, stats.energy.tokens, stats.energy.attributed_j, stats.steps,
                    served=sum(outcomes.get((replica.name, o), 0.0) for o in _SERVED),
                    failed=sum(outcomes.get((replica.name, o), 0.0) for o in _FAILED))
                history = self._replicas.setdefault((engine.name, replica.name), deque(maxlen=self._rate_steps + 1))
                history.append(now)
                last = history[0]
                dt = now.mono_s - last.mono_s
                if dt <= 0:
                    continue
                remote = isinstance(replica.engine, RemoteEngine)
                power_w, joules_per_token = _energy_rates(stats, now.steps - last.steps, now.tokens - last.tokens,
                                                          now.attributed_j - last.attributed_j, dt)
                out.append(ReplicaSample(
                    model=engine.name, replica=replica.name, kind="remote" if remote else "local",
                    state=replica.state(time.monotonic()), requests_running=stats.load.num_running,
                    requests_waiting=None if remote else stats.load.num_waiting,
                    kv_cache_usage=None if remote else stats.load.kv_usage,
                    tokens_per_s=(now.tokens - last.tokens) / dt, requests_per_s=(now.served - last.served) / dt,
                    failures_per_s=(now.failed - last.failed) / dt,
                    # A remote replica's joules arrive with its finished requests: a rate per step means nothing.
                    power_w=None if remote else power_w, joules_per_token=joules_per_token,
                ))
        return tuple(out)

    def after(self, seq: int) -> list[LiveSample]:
        return [s for s in self.samples if s.seq > seq]

    async def run(self) -> None:
        """Tick every interval until cancelled; a failed tick is logged and skipped, never fatal."""
        next_s = time.monotonic()
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("live sample failed")
            next_s += self.interval_s
            # A blocked loop must not cause a burst of catch-up ticks.
            next_s = max(next_s, time.monotonic())
            await asyncio.sleep(next_s - time.monotonic())


def live_route(sampler: LiveSampler) -> APIRouter:
    live = APIRouter()

    @live.get("/metrics/live")
    async def samples(after: int = Query(0, ge=0)) -> dict[str, Any]:
        """The last minutes of per-second samples (only those after sequence number `after`)."""
        return {
            "object": "live_samples", "models": [m.card.id for m in sampler.models],
            "energy_source": sampler.energy_source,
            "interval_s": sampler.interval_s, "window_s": sampler.window_s, "rate_window_s": sampler.rate_window_s,
            "capacity": sampler.samples.maxlen,
            "samples": [asdict(s) for s in sampler.after(after)],
        }

    return live
