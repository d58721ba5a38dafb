"""ModelRouter on fake engines (in this process, in a child to kill, and behind a remote HTTP app): retries,
ejection, continuation of a stream on another replica, 4xx passed through, 429 when all are full, fallbacks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from qanat.build import build_app, build_fake_engine
from qanat.config import EngineConfig, ServerConfig
from qanat.engine.client import Delta, Prompt, RequestHints, TokenPrompt
from qanat.engine.errors import EngineUnavailableError, QueueFullError
from qanat.engine.executors.fake import FakeSpec
from qanat.engine.local import LocalEngine
from qanat.engine.remote import RemoteEngine, RemoteSettings, UpstreamError
from qanat.engine.sampling import SamplingParams
from qanat.router.metrics import RouterMetrics
from qanat.router.policies import ReplicaView, RoundRobin, make_policy
from qanat.router.router import ModelRouter, Replica
from qanat.serving.state import ModelRegistry
from tests.helpers import run, tokenize

CONFIG = EngineConfig(ctx=256, parallel=2, batch_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=40)


def fake(in_process: bool = True, delay_s: float = 0.0, slots: int = 2, waiting: int = 8) -> LocalEngine:
    return build_fake_engine(EngineConfig(ctx=256, parallel=slots, batch_tokens=64, max_waiting=waiting),
                             FakeSpec(num_slots=slots, step_delay_s=delay_s), in_process=in_process)


def router(*engines: Any, policy: str = "round_robin", **kwargs: Any) -> ModelRouter:
    replicas = [Replica(ReplicaView(f"r{i}", capacity=2), e, **kwargs) for i, e in enumerate(engines)]
    return ModelRouter("m", replicas, make_policy(policy), RouterMetrics())


class Broken:
    """A replica that fails every request before its first token, as a dead upstream does."""

    def __init__(self, inner: LocalEngine) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                       hints: RequestHints | None = None) -> AsyncIterator[Delta]:
        self.calls += 1
        raise EngineUnavailableError("connection refused")
        yield  # an async generator, like every engine's


async def collect(engine: Any, prompt: Prompt, params: SamplingParams = GREEDY) -> list[Delta]:
    return [d async for d in engine.generate(prompt, params)]


async def killed_after(n: int, pid: int, deltas: AsyncIterator[Delta]) -> list[Delta]:
    """Every delta of a stream, the process `pid` killed (SIGKILL) once `n` of them have arrived."""
    got = []
    async for delta in deltas:
        got.append(delta)
        if len(got) == n:
            os.kill(pid, signal.SIGKILL)
    return got


@pytest.fixture()
def pair() -> Iterator[tuple[LocalEngine, LocalEngine]]:
    a, b = fake(), fake()
    yield a, b
    a.shutdown()
    b.shutdown()


def test_round_robin_through_the_app_with_replica_header_and_cards(pair: tuple[LocalEngine, LocalEngine]) -> None:
    app = build_app(ModelRegistry({"m": router(*pair)}), ServerConfig())

    async def go() -> tuple[list[str], dict[str, Any]]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            served = [(await client.post("/v1/chat/completions", json=body)).headers["x-qanat-replica"]
                      for _ in range(4)]
            return served, (await client.get("/v1/models")).json()

    served, models = run(go())
    assert served == ["r0", "r1", "r0", "r1"]
    card = models["data"][0]
    assert card["id"] == "m" and [r["state"] for r in card["replicas"]] == ["ready", "ready"]


def test_failure_before_the_first_token_is_retried_and_the_replica_ejected(
        pair: tuple[LocalEngine, LocalEngine]) -> None:
    broken = Broken(pair[0])
    r = router(broken, pair[1], fail_after=3, cooldown_s=60)
    prompt = TokenPrompt(tuple(tokenize(pair[1], "question")))
    outputs = [run(collect(r, prompt)) for _ in range(6)]
    assert all(o[-1].num_output_tokens == 40 and o[-1].replica == "r1" for o in outputs)
    assert broken.calls == 3  # round robin sent it every other request until the third failure ejected it
    assert [s["state"] for s in r.replica_states()] == ["ejected", "ready"]


def test_all_replicas_failing_is_503_and_all_full_is_429() -> None:
    a, b = fake(slots=1, waiting=0, delay_s=0.01), fake(slots=1, waiting=0, delay_s=0.01)
    try:
        r = router(a, b, policy="least_load")
        prompt = TokenPrompt(tuple(tokenize(a, "question")))

        async def crowd() -> list[Any]:
            long = SamplingParams(temperature=0, max_tokens=60)
            return await asyncio.gather(*(collect(r, prompt, long) for _ in range(3)), return_exceptions=True)

        results = run(crowd())
        assert sum(isinstance(x, list) for x in results) == 2
        assert sum(isinstance(x, QueueFullError) for x in results) == 1
        dead = router(Broken(a), Broken(b))
        with pytest.raises(EngineUnavailableError, match="no replica is available"):
            run(collect(dead, prompt))
    finally:
        a.shutdown()
        b.shutdown()


def test_a_stream_whose_replica_dies_continues_on_another_without_losing_or_repeating_a_token() -> None:
    dying, survivor = fake(in_process=False, delay_s=0.01), fake()
    try:
        r = router(dying, survivor)
        prompt = TokenPrompt(tuple(tokenize(survivor, "tell me about the qanats of Marrakech")))
        expected = run(collect(survivor, prompt))  # greedy: what the whole answer is, uninterrupted
        pid = dying.health().executor_pid
        assert pid is not None

        got = run(killed_after(10, pid, r.generate(prompt, GREEDY)))
        assert [d.replica for d in got[:10]] == ["r0"] * 10 and got[-1].replica == "r1"
        assert [t for d in got for t in d.token_ids] == [t for d in expected for t in d.token_ids]
        assert "".join(d.text for d in got) == "".join(d.text for d in expected)
        final = got[-1]
        assert final.num_output_tokens == 40 and final.num_prompt_tokens == len(prompt.token_ids)
    finally:
        dying.shutdown()
        survivor.shutdown()


def upstream(engine: LocalEngine) -> RemoteEngine:
    """`engine` served by a real Qanat app, reached over HTTP semantics through httpx's ASGI transport."""
    app = build_app(engine, ServerConfig())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://upstream/v1")
    return RemoteEngine(RemoteSettings("http://upstream/v1", "fake-model"), client=client)


def test_a_qanat_upstream_is_recognised_and_continues_a_stream_too() -> None:
    dying, behind = fake(in_process=False, delay_s=0.01), fake()
    try:
        remote = upstream(behind)
        r = router(dying, remote)
        prompt = TokenPrompt(tuple(tokenize(behind, "a question for two servers")))
        expected = run(collect(behind, prompt))
        pid = dying.health().executor_pid
        assert pid is not None

        run(remote.connect())
        assert remote.is_qanat
        got = run(killed_after(7, pid, r.generate(prompt, GREEDY)))
        assert got[-1].replica == "r1"
        assert "".join(d.text for d in got) == "".join(d.text for d in expected)
        assert got[-1].num_output_tokens == 40
    finally:
        dying.shutdown()
        behind.shutdown()


def test_upstream_client_errors_pass_through_unchanged() -> None:
    behind = fake()
    try:
        app = build_app(ModelRegistry({"m": router(upstream(behind))}), ServerConfig())
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_object"}}  # the fake engine refuses constraints: 400 upstream

        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
                return await client.post("/v1/chat/completions", json=body)

        via_router = run(go())
        assert via_router.status_code == 400
        assert via_router.json() == {"error": {"message": "the fake model has no grammar support",
                                               "type": "invalid_request_error", "param": "response_format",
                                               "code": None}}
        with pytest.raises(UpstreamError) as info:  # a client error is not the replica's failure: no retry
            run(collect(router(upstream(behind)), TokenPrompt((5, 6)), SamplingParams(logit_bias=((99999, 1.0),))))
        assert info.value.status == 400 and info.value.body["error"]["param"] == "logit_bias"
    finally:
        behind.shutdown()


def test_a_non_qanat_upstream_that_dies_mid_stream_ends_with_an_error() -> None:
    dying_behind = fake(in_process=False, delay_s=0.01)
    try:
        remote = upstream(dying_behind)  # never connected: treated as a foreign server, no continuation
        r = router(remote)
        pid = dying_behind.health().executor_pid
        assert pid is not None

        async def go() -> list[Delta]:
            deltas: list[Delta] = []
            task = asyncio.create_task(collect(r, TokenPrompt(tuple(tokenize(dying_behind, "x"))),
                                               SamplingParams(temperature=0, max_tokens=200)))
            while dying_behind.stats().steps < 10:
                await asyncio.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            deltas = await task
            return deltas

        with pytest.raises(EngineUnavailableError):
            run(go())
    finally:
        dying_behind.shutdown()


def test_fallback_serves_when_no_replica_of_the_model_is_available(pair: tuple[LocalEngine, LocalEngine]) -> None:
    down = router(Broken(pair[0]))
    down.replicas[0].probe_ok = False  # its health probe fails
    other = ModelRouter("other", [Replica(ReplicaView("o0", 2), pair[1])], RoundRobin(), RouterMetrics())
    down.fallbacks = [other]
    out = run(collect(down, TokenPrompt(tuple(tokenize(pair[1], "hi")))))
    assert out[-1].replica == "o0" and out[-1].num_output_tokens == 40
    assert down.health().ready  # through its fallback


def test_replica_json_is_what_v1_models_shows(pair: tuple[LocalEngine, LocalEngine]) -> None:
    states = router(*pair).replica_states()
    assert json.loads(json.dumps(states))[0] == {"name": "r0", "kind": "local", "qanat": True, "state": "ready",
                                                 "outstanding": 0, "joules_per_token": None,
                                                 "executor_pid": None}
