"""The relay's route in front of FastAPI (qanat/serving/relay.py): it serves only what it can prove relayable and
hands everything else, body intact, to the full pipeline, which answers errors as always; a client that leaves
mid-stream frees its replica at once. Real HTTP servers on 127.0.0.1, as the relay's socket client needs."""

from __future__ import annotations

import contextlib
import json
import socketserver
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from qanat.build import build_app
from qanat.config import ServerConfig
from qanat.engine.remote import RemoteEngine, RemoteSettings
from qanat.router.router import ModelRouter
from qanat.serving.state import ModelRegistry
from tests.helpers import served
from tests.router.test_relay import CHAT, events
from tests.router.test_router import router


@contextlib.contextmanager
def stub_upstream() -> Iterator[RemoteEngine]:
    """bench/stub_openai.py's plain upstream (a Qanat one would be recognised by the router's probes, and parsed)."""
    from bench.stub_openai import app as stub_app

    with served(stub_app) as url:
        yield RemoteEngine(RemoteSettings(f"{url}/v1", "stub"))


@contextlib.contextmanager
def routed(upstream: RemoteEngine, keys: tuple[str, ...] = ()) -> Iterator[tuple[str, ModelRouter]]:
    r = router(upstream)
    with served(build_app(ModelRegistry({"m": r}), ServerConfig(api_keys=keys))) as url:
        yield url, r


def relayed_requests(r: ModelRouter) -> float:
    value: float = r.metrics.requests.labels("m", "r0", "ok")._value.get()
    return value


def test_a_key_is_checked_before_anything_is_relayed() -> None:
    with stub_upstream() as remote, routed(remote, keys=("k1", "k2")) as (url, r):
        refused = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k3"})
        served_ = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer k2"})
        metrics = httpx.get(f"{url}/metrics", headers={"authorization": "Bearer k1"}).text
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert served_.status_code == 200 and served_.headers["x-qanat-replica"] == "r0"
    assert {json.loads(e)["model"] for e in events(served_.text)[:-1]} == {"stub"}  # the upstream's bytes
    assert relayed_requests(r) == 1
    # Counted by the gateway under the route's path, as requests through FastAPI are.
    assert 'qanat_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics
    assert 'qanat_requests_total{route="/v1/chat/completions",status="401"} 1.0' in metrics


@pytest.mark.parametrize(("change", "param"), [({"temperature": 7}, "temperature"),
                                               ({"messages": []}, "messages"),
                                               ({"max_tokens": "many"}, "max_tokens")])
def test_a_bad_request_gets_the_pipelines_400_and_never_reaches_the_upstream(change: dict[str, object],
                                                                            param: str) -> None:
    with stub_upstream() as remote, routed(remote) as (url, r):
        answer = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, **change})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or error["message"])
    assert relayed_requests(r) == 0 and r.replicas[0].view.outstanding == 0


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"hi"', b"{not json", json.dumps({**CHAT, "model": ["m"]}).encode(),
                                 json.dumps({**CHAT, "stream": "yes please"}).encode()])
def test_a_body_that_is_not_a_request_object_gets_a_400(raw: bytes) -> None:
    with stub_upstream() as remote, routed(remote) as (url, r):
        answer = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "invalid_request_error"
    assert relayed_requests(r) == 0


def test_fields_the_client_sent_reach_the_upstream_as_sent() -> None:
    seen: list[dict[str, object]] = []

    class Upstream(_Upstream):
        def answer(self, body: bytes) -> None:
            seen.append(json.loads(body))
            body = b'data: {"choices": []}\n\ndata: [DONE]\n\n'
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (len(body), body))

    with _tcp(Upstream) as port:
        remote = RemoteEngine(RemoteSettings(f"http://127.0.0.1:{port}/v1", "up"))
        with routed(remote) as (url, _):
            answer = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "vendor_extension": {"a": 1}})
    assert answer.status_code == 200 and events(answer.text) == ['{"choices": []}', "[DONE]"]
    assert seen == [{**CHAT, "vendor_extension": {"a": 1}, "model": "up"}]


def test_a_client_that_leaves_mid_stream_frees_the_replica_and_closes_the_upstream() -> None:
    closed = threading.Event()

    class Stalling(_Upstream):
        """One event, then silence (a model thinking) until the router hangs up."""

        def answer(self, body: bytes) -> None:
            event = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            self.connection.settimeout(30)
            with contextlib.suppress(OSError):
                if self.connection.recv(1) == b"":
                    closed.set()

    with _tcp(Stalling) as port:
        remote = RemoteEngine(RemoteSettings(f"http://127.0.0.1:{port}/v1", "up"))
        with routed(remote) as (url, r), httpx.Client() as client:
            with client.stream("POST", f"{url}/v1/chat/completions", json=CHAT) as response:
                chunks = response.iter_bytes()  # held: a dropped iterator would close the stream at once
                assert b'"content": "a"' in next(chunks)
                time.sleep(0.2)
                assert r.replicas[0].view.outstanding == 1  # still streaming, the upstream silent
            # The client has hung up, while the upstream still says nothing.
            assert closed.wait(10), "the router kept the upstream request open"
            deadline = time.monotonic() + 5
            while r.replicas[0].view.outstanding and time.monotonic() < deadline:
                time.sleep(0.02)
            assert r.replicas[0].view.outstanding == 0


def test_the_done_event_ends_the_response_and_the_upstreams_later_end_is_still_read() -> None:
    """[DONE] ends the client's response in the same write; the upstream's own end (its chunked terminator) may
    come later. The router still reads it and books the request as served: the complete response must not read
    as the client leaving."""

    class Trailing(_Upstream):
        def answer(self, body: bytes) -> None:
            first = b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n\n'
            done = b"data: [DONE]\n\n"
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                             b"\r\n%x\r\n%s\r\n" % (len(first), first))
            self.wfile.flush()
            time.sleep(0.1)  # past relay.WATCH_AFTER_S: the task that watches for the client leaving is running
            self.wfile.write(b"%x\r\n%s\r\n" % (len(done), done))
            self.wfile.flush()
            time.sleep(0.2)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    with _tcp(Trailing) as port:
        remote = RemoteEngine(RemoteSettings(f"http://127.0.0.1:{port}/v1", "up"))
        with routed(remote) as (url, r):
            answer = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
            deadline = time.monotonic() + 5
            while (relayed_requests(r) == 0 or r.replicas[0].view.outstanding) and time.monotonic() < deadline:
                time.sleep(0.02)
            served_ok, outstanding = relayed_requests(r), r.replicas[0].view.outstanding
    assert answer.status_code == 200 and events(answer.text)[-1] == "[DONE]"
    assert served_ok == 1 and outstanding == 0


class _Upstream(socketserver.StreamRequestHandler):
    """A bare HTTP/1.1 upstream of model "up": GETs (the router's probes) get its listing, each POST's body goes
    to `answer`."""

    def handle(self) -> None:
        request_line = self.rfile.readline()
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if request_line.startswith(b"POST"):
            self.answer(self.rfile.read(length))
        else:
            listing = b'{"data": [{"id": "up", "object": "model", "owned_by": "elsewhere"}]}'
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (len(listing), listing))

    def answer(self, body: bytes) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def _tcp(handler: type[socketserver.StreamRequestHandler]) -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()

