"""The byte relay's HTTP/1.1 client against tiny hand-written HTTP servers on 127.0.0.1 (asyncio.start_server on
the test's own loop), so that every byte, pause and close of the answer is under the test's control: chunked and
Content-Length bodies, keep-alive reuse, `Connection: close`, a connection dropped while idle, an upstream that
never answers, dies mid-body or answers garbage. Each test runs on asyncio's default loop and on uvloop (the
router's loop in production)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import pytest
import uvloop

from qanat.engine.upstream_http import UpstreamHTTP, UpstreamHTTPError, UpstreamStatus
from tests.e2e.server import free_port

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]

CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def whole(body: bytes, status: str = "200 OK", close: bool = False) -> bytes:
    """A Content-Length answer (keep-alive unless `close`)."""
    connection = b"Connection: close\r\n" if close else b""
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status.encode(), len(body), connection, body))


@dataclass
class Request:
    """One request as the server read it."""

    line: str  # e.g. "POST /v1/chat/completions HTTP/1.1"
    headers: dict[str, str]  # names lower-cased
    body: bytes
    connection: int  # which accepted connection carried it: 0, 1, ...


Answer = Callable[[Request, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def send(data: bytes) -> Answer:
    async def answer(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
    return answer


async def read_request(reader: asyncio.StreamReader, connection: int) -> Request | None:
    """The next request on the connection, or None at its end (the client closed it)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line, *header_lines = head.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (h.split(":", 1) for h in header_lines)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(line, headers, body, connection)


@dataclass
class Upstream:
    """A tiny HTTP/1.1 server: the n-th request it reads gets `answers[n]` (the last one for any further request);
    an answer may leave the connection open for more (keep-alive) or close it. It records what it saw."""

    answers: list[Answer]
    connections: int = 0  # accepted so far
    requests: list[Request] = field(default_factory=list)
    ended: dict[int, asyncio.Event] = field(default_factory=dict)  # per connection: the client closed it
    port: int = 0
    _open: dict[asyncio.StreamWriter, asyncio.Task[None]] = field(default_factory=dict)

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Stops listening and ends the connections still open, so that no handler is left to be cancelled with
        the loop (Python 3.11's streams log a cancelled handler as an error)."""
        self._server.close()
        for writer in self._open:
            writer.close()
        if self._open:
            await asyncio.wait(list(self._open.values()), timeout=1)  # bounded: a failed test may leave one waiting

    def url(self, path: str = "/v1") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def closed_by_client(self, connection: int) -> None:
        """Until the client has closed `connection` (the server read its end)."""
        await self.ended.setdefault(connection, asyncio.Event()).wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        self._open[writer] = cast(asyncio.Task[None], asyncio.current_task())
        try:
            while not writer.is_closing() and (request := await read_request(reader, number)) is not None:
                self.requests.append(request)
                await self.answers[min(len(self.requests), len(self.answers)) - 1](request, reader, writer)
            if not writer.is_closing():
                self.ended.setdefault(number, asyncio.Event()).set()
        except ConnectionError:
            pass
        finally:
            writer.close()
            del self._open[writer]


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Until the client closes the connection (whatever it still sends is ignored)."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(1 << 16):
            pass


async def silent(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers nothing, until the client closes the connection."""
    await until_closed(reader)


async def drop(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Closes the connection without a byte of answer (what a connection closed while idle looks like)."""
    writer.close()


def client(upstream_url: str, max_connections: int = 4, read_timeout_s: float = 5.0,
           headers: dict[str, str] | None = None) -> contextlib.closing[UpstreamHTTP]:
    return contextlib.closing(UpstreamHTTP(upstream_url, headers or {}, max_connections, connect_timeout_s=5.0,
                                           read_timeout_s=read_timeout_s))


async def post(http: UpstreamHTTP, body: bytes = b"{}", path: str = "/chat/completions") -> bytes:
    return b"".join([data async for data in http.post_stream(path, body)])


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    """Runs a test's coroutine on a fresh loop of each kind, with a bound so that a hang fails fast."""
    loop_factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def run_on_loop(coro: Coroutine[Any, Any, T]) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(10):
                return await coro

        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(bounded())

    return run_on_loop


def test_a_chunked_answer_is_yielded_as_it_comes(run: Run[None]) -> None:
    """The relay's point: each piece reaches the consumer when it arrives, not when the answer ends. The server
    sends its second chunk only once the client has yielded the first (else this would hang until a timeout)."""
    first, second = b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\ndata: [DONE]\n\n'
    yielded_first = asyncio.Event()

    async def stream(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(first))
        await yielded_first.wait()
        writer.write(chunk(second[:7]) + chunk(second[7:]) + LAST_CHUNK)

    async def go() -> None:
        async with Upstream([stream]) as upstream:
            with client(upstream.url(), read_timeout_s=2) as http:
                answer = http.post_stream("/chat/completions", b"{}")
                got = [await anext(answer)]
                assert got == [first]
                yielded_first.set()
                got += [data async for data in answer]
        assert b"".join(got) == first + second

    run(go())


def test_a_content_length_body(run: Run[None]) -> None:
    body = b'{"id": "x", "choices": [{"message": {"content": "' + b"w" * 100_000 + b'"}}]}'

    async def go() -> None:
        async with Upstream([send(whole(body))]) as upstream:
            with client(upstream.url()) as http:
                assert await post(http) == body

    run(go())


def test_a_large_body_comes_whole_to_a_slow_consumer(run: Run[None]) -> None:
    """More than the client reads ahead (it stops reading the socket while 256 KiB wait for the consumer): reading
    must resume as the consumer catches up, and no byte may be lost or repeated."""
    body = bytes(range(256)) * (4 << 12)  # 4 MiB

    async def go() -> None:
        async with Upstream([send(whole(body))]) as upstream:
            with client(upstream.url()) as http:
                got: list[bytes] = []
                async for data in http.post_stream("/chat/completions", b"{}"):
                    if not got:
                        await asyncio.sleep(0.05)  # the socket fills the client's read-ahead meanwhile
                    got.append(data)
        assert b"".join(got) == body
        assert len(got) > 1  # it came in parts, as read, not as one buffered body

    run(go())


def test_requests_reuse_one_kept_alive_connection_and_reach_the_server_exactly(run: Run[None]) -> None:
    """Two requests in turn go over one TCP connection; the request line (base_url's path + the path), Host,
    Content-Length, the caller's headers and the body arrive as written."""
    bodies = [b'{"model": "m", "n": 1}', b'{"model": "m", "text": "\xc3\xa9t\xc3\xa9"}']

    async def go() -> None:
        async with Upstream([send(whole(b'{"a": 1}')), send(whole(b'{"a": 2}'))]) as upstream:
            with client(upstream.url("/v1/"), headers={"Authorization": "Bearer sk-test"}) as http:
                answers = [await post(http, body) for body in bodies]
            assert answers == [b'{"a": 1}', b'{"a": 2}']
            assert upstream.connections == 1
            assert [r.connection for r in upstream.requests] == [0, 0]
            for request, body in zip(upstream.requests, bodies, strict=True):
                assert request.line == "POST /v1/chat/completions HTTP/1.1"
                assert request.headers["host"] == f"127.0.0.1:{upstream.port}"
                assert request.headers["content-length"] == str(len(body))
                assert request.headers["authorization"] == "Bearer sk-test"
                assert request.body == body

    run(go())


def test_an_answer_with_connection_close_is_not_reused(run: Run[None]) -> None:
    """The server says `Connection: close` but leaves the socket open: the client must close it itself and open a
    new one for the next request."""
    async def go() -> None:
        async with Upstream([send(whole(b"1", close=True)), send(whole(b"2"))]) as upstream:
            with client(upstream.url()) as http:
                assert await post(http) == b"1"
                assert await post(http) == b"2"
            assert [r.connection for r in upstream.requests] == [0, 1]
            await upstream.closed_by_client(0)

    run(go())


def test_a_body_ended_by_the_close_of_the_connection(run: Run[None]) -> None:
    """No Content-Length, not chunked: the body runs to the close (RFC 9112 6.3, an HTTP/1.0-style server). That
    close is the answer's end, not a failure."""
    body = b"data: 1\n\ndata: [DONE]\n\n"

    async def close_delimited(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    async def go() -> None:
        async with Upstream([close_delimited, send(whole(b"2"))]) as upstream:
            with client(upstream.url()) as http:
                assert await post(http) == body
                assert await post(http) == b"2"
            assert upstream.connections == 2

    run(go())


def test_a_status_other_than_200_raises_with_the_whole_body_before_any_yield(run: Run[None]) -> None:
    """A 429's body is what the router passes on to its client: it must come whole, even when it comes in parts."""
    error = b'{"error": {"message": "too many requests", "type": "rate_limit_error"}}'
    head = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"

    async def in_parts(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head + chunk(error[:20]))
        await asyncio.sleep(0.05)  # the client has most likely read the first part alone
        writer.write(chunk(error[20:]) + LAST_CHUNK)

    async def go() -> None:
        async with Upstream([in_parts]) as upstream:
            with client(upstream.url()) as http, pytest.raises(UpstreamStatus) as raised:
                await anext(http.post_stream("/chat/completions", b"{}"))
        assert (raised.value.status, raised.value.body) == (429, error)

    run(go())


def test_a_refused_connection_raises_at_once(run: Run[None]) -> None:
    """Nothing listens on the port: a refusal, not a wait for the connect timeout."""
    async def go() -> None:
        with (client(f"http://127.0.0.1:{free_port()}/v1") as http,
              pytest.raises(UpstreamHTTPError, match="cannot connect.*ConnectionRefusedError")):
            await post(http)

    run(go())


def test_an_upstream_that_never_answers_times_out(run: Run[None]) -> None:
    """The request reached the server, no answer came within read_timeout_s: an error, and the connection is
    closed (the upstream sees its end) rather than left to a late answer."""
    async def go() -> None:
        async with Upstream([silent]) as upstream:
            with (client(upstream.url(), read_timeout_s=0.2) as http,
                  pytest.raises(UpstreamHTTPError, match="no answer from 127.0.0.1:.* in 0.2 s")):
                await post(http)
            await upstream.closed_by_client(0)
            assert len(upstream.requests) == 1

    run(go())


def test_a_connection_the_upstream_closed_while_idle_is_replaced_transparently(run: Run[None]) -> None:
    """The upstream answers with keep-alive, then closes the idle connection: the next request must not fail."""
    async def answer_then_close(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(whole(b"1"))
        await writer.drain()
        writer.close()

    async def go() -> None:
        async with Upstream([answer_then_close, send(whole(b"2"))]) as upstream:
            with client(upstream.url()) as http:
                assert await post(http) == b"1"
                await asyncio.sleep(0.01)  # the close has most likely reached the client, as with a real idle close
                assert await post(http) == b"2"
            assert upstream.connections == 2
            assert [r.connection for r in upstream.requests] == [0, 1]

    run(go())


def test_a_request_on_a_reused_connection_that_is_closed_without_a_byte_is_sent_again_once(run: Run[None]) -> None:
    """The race the retry exists for, made certain: the request goes out on the pooled connection, the upstream
    closes it without a byte of answer (it had decided to drop it while idle); the client sends it again on a
    new connection, once."""
    async def go() -> None:
        async with Upstream([send(whole(b"1")), drop, send(whole(b"2"))]) as upstream:
            with client(upstream.url()) as http:
                assert await post(http) == b"1"
                assert await post(http, b'{"n": 2}') == b"2"
            assert [(r.connection, r.body) for r in upstream.requests] == [(0, b"{}"), (0, b'{"n": 2}'),
                                                                           (1, b'{"n": 2}')]

    run(go())


@pytest.mark.parametrize("cut", [CHUNKED_HEAD + chunk(b"data: 1\n\n") + b"f\r\ndata: ",
                                 b"HTTP/1.1 200 OK\r\nTransfer-Enc"], ids=["mid-body", "mid-headers"])
def test_an_upstream_that_dies_mid_answer_raises_and_is_not_retried(run: Run[None], cut: bytes) -> None:
    """Bytes of the answer came back, so the upstream did take the request: it must not be sent again (even on a
    reused connection, where a failure before the answer would be), and the body's bytes that came were yielded
    first (a byte relay: part of a chunk too; the relay above regroups whole events)."""
    async def cut_then_close(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(cut)
        await writer.drain()
        writer.close()

    async def go() -> None:
        async with Upstream([send(whole(b"1")), cut_then_close, send(whole(b"never"))]) as upstream:
            with client(upstream.url()) as http:
                assert await post(http) == b"1"  # so that the next request goes on a pooled connection
                got: list[bytes] = []
                with pytest.raises(UpstreamHTTPError, match="closed the connection"):
                    async for data in http.post_stream("/chat/completions", b"{}"):
                        got.append(data)
            assert b"".join(got) == (b"data: 1\n\ndata: " if cut.startswith(CHUNKED_HEAD) else b"")
            assert len(upstream.requests) == 2 and upstream.connections == 1

    run(go())


def test_a_connection_lost_while_the_consumer_is_busy_raises_at_its_next_read(run: Run[None]) -> None:
    """The upstream died while the consumer was elsewhere (writing to a slow client): the failure is known, so
    the next read raises it at once rather than waiting out a read timeout and blaming a silent upstream."""
    cut = asyncio.Event()

    async def cut_then_close(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        writer.close()
        await writer.wait_closed()
        cut.set()

    async def go() -> None:
        async with Upstream([cut_then_close]) as upstream:
            with client(upstream.url(), read_timeout_s=5) as http:
                stream = http.post_stream("/chat/completions", b"{}")
                assert await anext(stream) == b"data: 1\n\n"
                await cut.wait()
                await asyncio.sleep(0.01)  # the close reaches the client while it is not reading
                with pytest.raises(UpstreamHTTPError, match="closed the connection"):
                    await anext(stream)

    run(go())


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_a_consumer_that_stops_early_closes_the_connection(run: Run[None], how: str) -> None:
    """The router's client went away mid-stream: the upstream must see the connection end (so that it stops
    generating), and the connection must not go back to the pool in the middle of an answer."""
    async def endless(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        await until_closed(reader)

    async def go() -> None:
        async with Upstream([endless, send(whole(b"2"))]) as upstream:
            with client(upstream.url()) as http:
                stream = http.post_stream("/chat/completions", b"{}")
                if how == "aclose":
                    assert await anext(stream) == b"data: 1\n\n"
                    await stream.aclose()
                else:
                    first = asyncio.Event()

                    async def consume() -> None:
                        async for _ in stream:
                            first.set()

                    task = asyncio.create_task(consume())
                    await first.wait()
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                await upstream.closed_by_client(0)
                assert await post(http) == b"2"
            assert [r.connection for r in upstream.requests] == [0, 1]

    run(go())


def test_a_request_cancelled_while_waiting_on_a_reused_connection_closes_it(run: Run[None]) -> None:
    """Cancelled before the answer's headers, on a pooled connection: the upstream must see the end all the same."""
    async def go() -> None:
        async with Upstream([send(whole(b"1")), silent]) as upstream:
            with client(upstream.url()) as http:
                assert await post(http) == b"1"
                task = asyncio.create_task(post(http))
                while len(upstream.requests) < 2:
                    await asyncio.sleep(0.001)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await upstream.closed_by_client(0)

    run(go())


def test_a_timeout_on_a_reused_connection_is_not_retried(run: Run[None]) -> None:
    """No answer within read_timeout_s on a pooled connection is not a stale connection (it did not close): the
    request is not sent a second time (the upstream may be working on it), and the error comes after one timeout."""
    async def go() -> None:
        async with Upstream([send(whole(b"1")), silent]) as upstream:
            with client(upstream.url(), read_timeout_s=0.2) as http:
                assert await post(http) == b"1"
                with pytest.raises(UpstreamHTTPError, match="no answer"):
                    await post(http)
            assert len(upstream.requests) == 2 and upstream.connections == 1

    run(go())


def test_max_connections_holds_a_second_request_until_the_first_is_done(run: Run[None]) -> None:
    """max_connections=1: the second request reaches the server only after the first answer has ended."""
    log: list[str] = []
    release = asyncio.Event()

    async def slow(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log.append(f"request {request.body.decode()}")
        writer.write(CHUNKED_HEAD + chunk(b"a"))
        await release.wait()
        writer.write(LAST_CHUNK)
        await writer.drain()
        log.append(f"answered {request.body.decode()}")

    async def go() -> None:
        async with Upstream([slow]) as upstream:
            with client(upstream.url(), max_connections=1) as http:
                first = asyncio.create_task(post(http, b"1"))
                second = asyncio.create_task(post(http, b"2"))
                while not log:
                    await asyncio.sleep(0.001)
                await asyncio.sleep(0.1)  # room for the second request to reach the server, were it not held back
                assert log == ["request 1"]
                release.set()
                assert list(await asyncio.gather(first, second)) == [b"a", b"a"]
            assert log == ["request 1", "answered 1", "request 2", "answered 2"]
            assert upstream.connections == 1

    run(go())


def test_an_answer_that_is_not_http_raises(run: Run[None]) -> None:
    async def go() -> None:
        async with Upstream([send(b"SSH-2.0-OpenSSH_9.6\r\n")]) as upstream:
            with client(upstream.url()) as http, pytest.raises(UpstreamHTTPError, match="not HTTP"):
                await post(http)

    run(go())


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/v1", "127.0.0.1:8000/v1", "http:///v1", "unix:///tmp/s"])
def test_a_base_url_that_is_not_http_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="must be http:// or https://"):
        UpstreamHTTP(url, {}, 1, 1.0, 1.0)
