"""The byte relay: a streamed request to a model served by plain OpenAI-compatible upstreams passes through the
router as the upstream's bytes (no per-token parsing), with retries before the first bytes, 4xx passed through,
and an error event, never a silent cut or half an event, when the upstream fails mid-stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from qanat.build import build_app, build_fake_engine
from qanat.config import EngineConfig, ServerConfig
from qanat.engine.executors.fake import FakeSpec
from qanat.engine.local import LocalEngine
from qanat.engine.remote import RemoteEngine, RemoteSettings
from qanat.router.router import ModelRouter
from qanat.serving.pipeline import _relayed_sse
from qanat.serving.state import ModelRegistry
from tests.helpers import run
from tests.router.test_router import fake, router, upstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0,
        "stream": True}


@pytest.fixture()
def behind() -> Iterator[LocalEngine]:
    engine = fake()
    yield engine
    engine.shutdown()


def post(r: ModelRouter, body: dict[str, Any]) -> httpx.Response:
    app = build_app(ModelRegistry({"m": r}), ServerConfig())

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
            return await client.post("/v1/chat/completions", json=body)

    return run(go())


def events(body: str) -> list[str]:
    return [e.removeprefix("data: ") for e in body.split("\n\n") if e]


def test_a_stream_to_a_plain_upstream_passes_through_as_its_bytes(behind: LocalEngine) -> None:
    r = router(upstream(behind))
    assert r.can_relay()
    relayed = post(r, CHAT)
    direct = post(router(upstream(behind)), {**CHAT, "stream": False})  # parsed path, for the text
    assert relayed.status_code == 200 and relayed.headers["x-qanat-replica"] == "r0"
    chunks = [json.loads(e) for e in events(relayed.text)[:-1]]
    assert events(relayed.text)[-1] == "[DONE]"
    # The upstream's own chunks: its model name, not the one the client sent (the parsed path writes "m").
    assert {c["model"] for c in chunks} == {"fake-model"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == direct.json()["choices"][0]["message"]["content"]
    assert r.metrics.requests.labels("m", "r0", "ok")._value.get() == 1
    assert r.replicas[0].view.outstanding == 0


def test_qanat_replicas_and_requests_with_tools_are_parsed_not_relayed(behind: LocalEngine) -> None:
    assert not router(behind).can_relay()  # a local engine
    roomy = build_fake_engine(EngineConfig(ctx=1024, parallel=2, batch_tokens=64),
                              FakeSpec(num_slots=2, context_length=1024))
    try:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        answer = post(router(upstream(roomy)), {**CHAT, "tools": tools})
        assert answer.status_code == 200
        assert {json.loads(e)["model"] for e in events(answer.text)[:-1]} == {"m"}  # written here, not relayed
    finally:
        roomy.shutdown()


def test_a_failure_before_the_first_bytes_is_retried_on_another_replica(behind: LocalEngine) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    dead = RemoteEngine(RemoteSettings("http://dead/v1", "fake-model"),
                        client=httpx.AsyncClient(transport=httpx.MockTransport(refuse), base_url="http://dead/v1"))
    r = router(dead, upstream(behind))
    answer = post(r, CHAT)
    assert answer.status_code == 200 and answer.headers["x-qanat-replica"] == "r1"
    assert r.metrics.requests.labels("m", "r0", "failed")._value.get() == 1
    assert events(answer.text)[-1] == "[DONE]"


def test_an_upstream_client_error_passes_through_unchanged(behind: LocalEngine) -> None:
    answer = post(router(upstream(behind)), {**CHAT, "response_format": {"type": "json_object"}})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "response_format"


class _CutStream(httpx.AsyncByteStream):
    def __init__(self, parts: list[bytes], fail: bool) -> None:
        self.parts, self.fail = parts, fail

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part
        if self.fail:
            raise httpx.ReadError("connection reset by peer")


def cut_upstream(parts: list[bytes], fail: bool) -> RemoteEngine:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_CutStream(parts, fail), headers={"content-type": "text/event-stream"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://cut/v1")
    return RemoteEngine(RemoteSettings("http://cut/v1", "up"), client=client)


@pytest.mark.parametrize("fail", [True, False], ids=["connection reset", "no [DONE]"])
def test_a_stream_cut_mid_way_ends_with_an_error_event_and_no_half_event(fail: bool) -> None:
    whole = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
    r = router(cut_upstream([whole, b'data: {"choices": [{"ind'], fail))
    answer = post(r, CHAT)
    assert answer.status_code == 200
    got = events(answer.text)
    assert got[0] == whole.decode().removeprefix("data: ").strip()
    error = json.loads(got[1])["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_unavailable")
    assert ("reset by peer" if fail else "ended before [DONE]") in error["message"]
    assert got[2:] == ["[DONE]"]
    assert r.metrics.requests.labels("m", "r0", "failed")._value.get() == 1


def test_relayed_events_are_regrouped_whole_whatever_the_reads() -> None:
    async def reads() -> AsyncIterator[bytes]:
        for part in (b"data: 1\n", b"\ndata: 2", b"2\n\ndata: 3\n\nda", b"ta: [DONE]\n\n"):
            yield part

    async def collect() -> list[bytes]:
        return [chunk async for chunk in _relayed_sse(reads())]

    out = run(collect())
    assert out == [b"data: 1\n\n", b"data: 22\n\ndata: 3\n\n", b"data: [DONE]\n\n"]
