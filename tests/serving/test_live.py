"""Live samples on the fake engine: the same numbers as /metrics, null (never 0) where a figure does not exist,
the ring buffer, the route behind the API key, and the sampler task the app runs while served."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from qanat.build import build_app, build_fake_engine
from qanat.config import EngineConfig, ServerConfig
from qanat.engine.client import EngineStats
from qanat.engine.executors.fake import FakeSpec
from qanat.engine.local import LocalEngine
from qanat.router.metrics import RouterMetrics
from qanat.router.policies import ReplicaView, make_policy
from qanat.router.router import ModelRouter, Replica
from qanat.serving.live import LiveSampler, histogram_quantile
from qanat.serving.state import ModelRegistry

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0}
INF = math.inf


@pytest.fixture
def engine() -> Iterator[LocalEngine]:
    eng = build_fake_engine(EngineConfig(ctx=256, parallel=2, batch_tokens=64), FakeSpec(num_slots=2))
    yield eng
    eng.shutdown()


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def buckets(metrics: dict[Any, float], name: str) -> tuple[tuple[float, float], ...]:
    found = [(float(dict(labels)["le"]), v) for (n, labels), v in metrics.items() if n == f"{name}_bucket"]
    return tuple(sorted(found))


def test_histogram_quantile_is_prometheus_s() -> None:
    # 10 observations: 4 in (0, 0.1], 4 in (0.1, 0.2], 2 above 0.5.
    b = ((0.1, 4.0), (0.2, 8.0), (0.5, 8.0), (INF, 10.0))
    assert histogram_quantile(0.5, b) == pytest.approx(0.125)  # rank 5: a quarter into (0.1, 0.2]
    assert histogram_quantile(0.2, b) == pytest.approx(0.05)  # rank 2: half of (0, 0.1]
    assert histogram_quantile(0.99, b) == 0.5  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, ((0.1, 0.0), (INF, 0.0))) is None


def test_samples_are_the_numbers_of_metrics(engine: LocalEngine) -> None:
    app = build_app(engine, ServerConfig())
    live: LiveSampler = app.state.qanat.live

    async def scenario() -> tuple[str, str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
            before = (await client.get("/metrics")).text
            assert live.tick(mono_s=100.0, wall_s=1000.0) is None  # the first reading opens the first interval
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(3)))
            assert all(r.status_code == 200 for r in replies)
            return before, (await client.get("/metrics")).text

    before_text, after_text = asyncio.run(scenario())
    sample = live.tick(mono_s=102.0, wall_s=1002.0)
    assert sample is not None and sample.seq == 1 and sample.t == 1002.0
    a, b = scrape(before_text), scrape(after_text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return b[key] - a.get(key, 0.0)

    assert sample.generation_tokens_per_s * 2 == delta("qanat_generation_tokens_total") == 18
    assert sample.prompt_tokens_per_s * 2 == delta("qanat_prefix_cache_query_tokens_total") > 0
    source = engine.card.energy_source
    requests_j = delta("qanat_energy_joules_total", source=source, kind="requests")
    assert sample.power_w is not None and requests_j > 0
    assert sample.power_w == pytest.approx(requests_j / 2)
    tokens = (b[("qanat_tokens_per_joule", (("source", source),))] * b[("qanat_energy_joules_total",
              (("kind", "requests"), ("source", source)))])
    assert sample.joules_per_token == pytest.approx(requests_j / tokens)  # nothing ran before: Δtokens = tokens
    for name, p50, p99 in (("qanat_time_to_first_token_seconds", sample.ttft_p50_s, sample.ttft_p99_s),
                           ("qanat_inter_token_latency_seconds", sample.itl_p50_s, sample.itl_p99_s)):
        window = tuple((le, v - dict(buckets(a, name)).get(le, 0.0)) for le, v in buckets(b, name))
        assert p50 == histogram_quantile(0.5, window) and p50 is not None
        assert p99 == histogram_quantile(0.99, window)
    assert sample.requests_running == b[("qanat_num_requests_running", ())] == 0
    assert sample.kv_cache_usage == b[("qanat_kv_cache_usage_ratio", ())]


def test_figures_that_do_not_exist_are_null_never_zero(engine: LocalEngine) -> None:
    app = build_app(engine, ServerConfig())
    live: LiveSampler = app.state.qanat.live
    live.tick(mono_s=0.0)
    idle = live.tick(mono_s=1.0)
    assert idle is not None
    assert (idle.ttft_p50_s, idle.itl_p99_s, idle.power_w, idle.joules_per_token, idle.prefix_cache_hit_ratio) == (
        None, None, None, None, None)
    assert idle.generation_tokens_per_s == 0.0 and idle.requests_running == 0  # these are real zeros

    async def one() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200

    asyncio.run(one())
    busy = live.tick(mono_s=2.0)
    for second in range(3, 8):
        quiet = live.tick(mono_s=float(second))
    # No step ran in the last 5 s (the rate window), but the 10 s latency window still holds the request.
    assert busy is not None and quiet is not None
    assert busy.power_w is not None and busy.power_w > 0 and busy.ttft_p50_s is not None
    assert quiet.power_w is None and quiet.joules_per_token is None and quiet.ttft_p50_s == busy.ttft_p50_s
    assert quiet.generation_tokens_per_s == 0.0
    for second in range(8, 13):
        last = live.tick(mono_s=float(second))
    assert last is not None and last.ttft_p50_s is None and last.itl_p50_s is None  # out of the 10 s window


def test_no_meter_means_no_energy_figures(engine: LocalEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    live = LiveSampler(ModelRegistry.of(engine), build_app(engine, ServerConfig()).state.qanat.metrics)
    real_stats = engine.stats

    def unmetered() -> EngineStats:  # steps ran and "joules" moved, but no meter stands behind them
        stats = real_stats()
        energy = replace(stats.energy, source="none", attributed_j=stats.energy.attributed_j + 1.0,
                         tokens=stats.energy.tokens + 10)
        return replace(stats, energy=energy, steps=stats.steps + 1)

    live.tick(mono_s=0.0)
    monkeypatch.setattr(engine, "stats", unmetered)
    sample = live.tick(mono_s=1.0)
    assert sample is not None and sample.power_w is None and sample.joules_per_token is None


def test_ring_buffer_keeps_the_last_samples_and_serves_those_after_a_seq(engine: LocalEngine) -> None:
    live = LiveSampler(ModelRegistry.of(engine), build_app(engine, ServerConfig()).state.qanat.metrics, capacity=5)
    for second in range(9):
        live.tick(mono_s=float(second))
    assert [s.seq for s in live.samples] == [4, 5, 6, 7, 8]
    assert [s.seq for s in live.after(6)] == [7, 8] and live.after(8) == []


def get(app: FastAPI, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(go())


def test_route_needs_the_key_and_returns_samples_after_seq(engine: LocalEngine) -> None:
    app = build_app(engine, ServerConfig(api_keys=("k1",)))
    live: LiveSampler = app.state.qanat.live
    for second in range(4):
        live.tick(mono_s=float(second))
    assert get(app, "/metrics/live").status_code == 401
    assert get(app, "/metrics/live", {"Authorization": "Bearer nope"}).status_code == 401
    body = get(app, "/metrics/live?after=1", {"Authorization": "Bearer k1"}).json()
    assert [s["seq"] for s in body["samples"]] == [2, 3]
    assert body["models"] == ["fake-model"] and body["energy_source"] == "estimated:fake" and body["capacity"] == 300
    assert body["samples"][0]["power_w"] is None  # null in JSON, not 0
    assert get(app, "/metrics/live?after=-1", {"Authorization": "Bearer k1"}).status_code == 400


def test_run_ticks_every_interval_and_survives_a_failed_tick(engine: LocalEngine,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    live = LiveSampler(ModelRegistry.of(engine), build_app(engine, ServerConfig()).state.qanat.metrics,
                       interval_s=0.02)
    real_stats, calls = engine.stats, []

    def flaky() -> EngineStats:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("engine busy restarting")
        return real_stats()

    monkeypatch.setattr(engine, "stats", flaky)

    async def scenario() -> None:
        task = asyncio.create_task(live.run())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    seqs = [s.seq for s in live.samples]
    assert len(seqs) >= 5 and seqs == list(range(1, len(seqs) + 1))


def test_the_app_samples_while_it_is_served(engine: LocalEngine) -> None:
    app = build_app(engine, ServerConfig())
    live: LiveSampler = app.state.qanat.live

    async def scenario() -> tuple[int, int]:
        async with app.router.lifespan_context(app):
            await asyncio.sleep(1.3)
            during = len(live.samples)
        await asyncio.sleep(1.1)
        return during, len(live.samples)

    during, after = asyncio.run(scenario())
    assert during >= 1 and after == during  # ticking while served, stopped with the app


def test_each_replica_of_a_router_has_its_figures() -> None:
    a, b = (build_fake_engine(EngineConfig(ctx=256, parallel=2, batch_tokens=64)) for _ in range(2))
    replicas = [Replica(ReplicaView(name, capacity=2), e) for name, e in (("ra", a), ("rb", b))]
    router = ModelRouter("m", replicas, make_policy("round_robin"), RouterMetrics())
    app = build_app(ModelRegistry({"m": router}), ServerConfig())
    live: LiveSampler = app.state.qanat.live
    body = {**CHAT, "model": "m"}

    async def three() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
            return [(await client.post("/v1/chat/completions", json=body)).headers["x-qanat-replica"]
                    for _ in range(3)]

    try:
        live.tick(mono_s=0.0)
        served = asyncio.run(three())
        sample = live.tick(mono_s=2.0)
        assert sample is not None and sorted(served) == ["ra", "ra", "rb"]
        by_name = {r.replica: r for r in sample.replicas}
        assert set(by_name) == {"ra", "rb"} and all(r.model == "m" and r.kind == "local" for r in sample.replicas)
        assert by_name["ra"].requests_per_s == 1.0 and by_name["rb"].requests_per_s == 0.5  # 2 and 1 in 2 s
        assert by_name["ra"].failures_per_s == 0.0 and by_name["ra"].state == "ready"
        # The replicas' parts add up to the model's figures, as the router adds them up for /metrics.
        assert sum(r.tokens_per_s for r in sample.replicas) * 2 == a.stats().energy.tokens + b.stats().energy.tokens
        assert by_name["ra"].power_w is not None and by_name["ra"].power_w > 0
        assert by_name["ra"].requests_waiting == 0 and by_name["ra"].kv_cache_usage is not None
        for second in range(3, 8):  # past the 5 s rate window
            quiet = live.tick(mono_s=float(second))
        assert quiet is not None and all(r.power_w is None and r.requests_per_s == 0.0 for r in quiet.replicas)
    finally:
        a.shutdown()
        b.shutdown()


def test_rates_are_over_the_last_five_seconds(engine: LocalEngine) -> None:
    app = build_app(engine, ServerConfig())
    live: LiveSampler = app.state.qanat.live

    async def one() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200

    live.tick(mono_s=0.0)
    asyncio.run(one())  # 6 tokens between 0 s and 1 s
    rates = [live.tick(mono_s=float(second)) for second in range(1, 8)]
    assert [r.generation_tokens_per_s for r in rates if r is not None] == [6.0, 3.0, 2.0, 1.5, 1.2, 0.0, 0.0]
