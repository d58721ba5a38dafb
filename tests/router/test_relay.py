"""The byte relay: a streamed request to a model served by plain OpenAI-compatible upstreams passes through the
router as the upstream's bytes (no per-token parsing), with retries before the first bytes, 4xx passed through,
and an error event, never a silent cut or half an event, when the upstream fails mid-stream. The upstreams are
real HTTP servers on 127.0.0.1 (the relay's client, engine/upstream_http.py, only speaks to sockets)."""

from __future__ import annotations

import contextlib
import json
import socketserver
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from qanat.build import build_app, build_fake_engine
from qanat.config import EngineConfig, ServerConfig
from qanat.engine.executors.fake import FakeSpec
from qanat.engine.local import LocalEngine
from qanat.engine.remote import RemoteEngine, RemoteSettings
from qanat.router.router import ModelRouter
from qanat.serving.relay import relay_sse
from qanat.serving.state import ModelRegistry
from tests.e2e.server import free_port
from tests.helpers import run, served
from tests.router.test_router import fake, router

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0,
        "stream": True}


@contextlib.contextmanager
def plain_upstream(engine: LocalEngine) -> Iterator[RemoteEngine]:
    """`engine` behind a real Qanat app on a socket, taken for a plain upstream (never connected, so not known
    to be Qanat)."""
    with served(build_app(engine, ServerConfig())) as url:
        yield RemoteEngine(RemoteSettings(f"{url}/v1", "fake-model"))


@pytest.fixture()
def behind() -> Iterator[LocalEngine]:
    engine = fake()
    yield engine
    engine.shutdown()


def post(r: ModelRouter, body: dict[str, Any]) -> httpx.Response:
    app = build_app(ModelRegistry({"m": r}), ServerConfig())

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://q") as client:
            response = await client.post("/v1/chat/completions", json=body)
        for replica in r.replicas:
            if isinstance(replica.engine, RemoteEngine):
                await replica.engine.aclose()
        return response

    return run(go())


def events(body: str) -> list[str]:
    return [e.removeprefix("data: ") for e in body.split("\n\n") if e]


def test_a_stream_to_a_plain_upstream_passes_through_as_its_bytes(behind: LocalEngine) -> None:
    with plain_upstream(behind) as remote:
        r = router(remote)
        assert r.can_relay()
        relayed = post(r, CHAT)
    with plain_upstream(behind) as remote:
        direct = post(router(remote), {**CHAT, "stream": False})  # the parsed path, for the text
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
        with plain_upstream(roomy) as remote:
            answer = post(router(remote), {**CHAT, "tools": tools})
        assert answer.status_code == 200
        assert {json.loads(e)["model"] for e in events(answer.text)[:-1]} == {"m"}  # written here, not relayed
    finally:
        roomy.shutdown()


def test_a_failure_before_the_first_bytes_is_retried_on_another_replica(behind: LocalEngine) -> None:
    dead = RemoteEngine(RemoteSettings(f"http://127.0.0.1:{free_port()}/v1", "fake-model"))  # nothing listens
    with plain_upstream(behind) as remote:
        r = router(dead, remote)
        answer = post(r, CHAT)
    assert answer.status_code == 200 and answer.headers["x-qanat-replica"] == "r1"
    assert r.metrics.requests.labels("m", "r0", "failed")._value.get() == 1
    assert events(answer.text)[-1] == "[DONE]"


def test_an_upstream_client_error_passes_through_unchanged(behind: LocalEngine) -> None:
    with plain_upstream(behind) as remote:
        answer = post(router(remote), {**CHAT, "response_format": {"type": "json_object"}})
    assert answer.status_code == 400
    assert answer.json() == {"error": {"message": "the fake model has no grammar support",
                                       "type": "invalid_request_error", "param": "response_format", "code": None}}


@contextlib.contextmanager
def cut_upstream(parts: list[bytes], reset: bool) -> Iterator[RemoteEngine]:
    """A server that streams `parts` as HTTP chunks, then drops the connection mid-body (`reset`) or ends the
    body properly, without a [DONE]."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            length = 0
            while (line := self.rfile.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.rfile.read(length)
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
            for part in parts:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            if not reset:
                self.wfile.write(b"0\r\n\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield RemoteEngine(RemoteSettings(f"http://127.0.0.1:{server.server_address[1]}/v1", "up"))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("reset", [True, False], ids=["connection dropped", "no [DONE]"])
def test_a_stream_cut_mid_way_ends_with_an_error_event_and_no_half_event(reset: bool) -> None:
    whole = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
    with cut_upstream([whole, b'data: {"choices": [{"ind'], reset) as remote:
        r = router(remote)
        answer = post(r, CHAT)
    assert answer.status_code == 200
    got = events(answer.text)
    assert got[0] == whole.decode().removeprefix("data: ").strip()
    error = json.loads(got[1])["error"]
    assert (error["type"], error["code"]) == ("server_error", "engine_unavailable")
    assert ("ended before [DONE]" not in error["message"]) == reset
    assert got[2:] == ["[DONE]"]
    assert r.metrics.requests.labels("m", "r0", "failed")._value.get() == 1


def test_relayed_events_are_regrouped_whole_whatever_the_reads() -> None:
    async def reads() -> AsyncIterator[bytes]:
        for part in (b"data: 1\n", b"\ndata: 2", b"2\n\ndata: 3\n\nda", b"ta: [DONE]\n\n"):
            yield part

    async def collect() -> list[bytes]:
        return [chunk async for chunk in relay_sse(reads())]

    out = run(collect())
    assert out == [b"data: 1\n\n", b"data: 22\n\ndata: 3\n\n", b"data: [DONE]\n\n"]


def test_the_official_client_streams_through_the_router_to_a_plain_upstream() -> None:
    from bench.stub_openai import CHUNKS
    from bench.stub_openai import app as stub_app

    with served(stub_app) as stub_url:
        r = router(RemoteEngine(RemoteSettings(f"{stub_url}/v1", "stub")))
        with served(build_app(ModelRegistry({"m": r}), ServerConfig())) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
            stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                    stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
        f"w{i} " for i in range(CHUNKS))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == CHUNKS
    assert r.metrics.requests.labels("m", "r0", "ok")._value.get() == 1
