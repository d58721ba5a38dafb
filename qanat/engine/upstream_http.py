"""The byte relay's HTTP/1.1 client: POST a JSON body to an upstream, stream the answer's body back as it comes.

A router adds its own work to every request it relays (issue 12: ≤ 2 ms p50 added at concurrency 16 in front of
an upstream that answers at once), and a general client's per-request machinery was the largest part of it:
aiohttp's request and response objects, cookie jar, tracing, timers and payload classes were ≈35 % of the
router's CPU per relayed request (py-spy, bench/router_bench.py latency). The relay needs one thing: a POST on a
kept-alive connection and the body's bytes. This does that with httptools (the C parser uvicorn already uses)
over an asyncio protocol, and nothing else: no redirects, cookies, proxies or compression (it asks for none).

A connection goes back to the pool only after a complete response that allows keep-alive; a response left early
(the client went away, an error) closes its connection. A reused connection that the upstream had closed
while idle fails before any byte of the answer; that request is sent again once on a new connection, as
aiohttp and httpx do, so a stale socket never counts as the replica's failure.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncGenerator
from typing import cast
from urllib.parse import urlsplit

import httptools

_PAUSE_BYTES = 1 << 18  # stop reading from the socket while this much of the body waits for the consumer


class UpstreamHTTPError(Exception):
    """The connection could not be made, broke, timed out, or the answer was not HTTP."""


class UpstreamStatus(Exception):  # noqa: N818 (an answer, not a failure of the client)
    """The upstream answered with a status other than 200; its body, read whole."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one exchange at a time. The parser's callbacks fill `chunks` and wake the reader."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.status = 0
        self.keep_alive = False
        self.headers_done = False
        self.complete = False
        self.received_any = False  # a byte of the current answer came back
        self.framed = False  # the answer has a Content-Length or Transfer-Encoding, else its body ends at the close
        self.error: BaseException | None = None
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamHTTPError(f"the upstream's answer is not HTTP: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is None and self.headers_done and not self.framed and not self.complete:
            self.complete = True  # a body delimited by the close (RFC 9112 6.3), which httptools cannot know
            self._wake()
        if not self.complete:
            self._fail(UpstreamHTTPError(f"the upstream closed the connection ({exc or 'end of stream'})"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _PAUSE_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # the exchange
    def begin(self, request: bytes) -> None:
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers_done, self.complete, self.received_any, self.framed = 0, False, False, False, False
        self.transport.write(request)

    async def wait(self) -> None:
        """Until the parser has news (or the connection failed)."""
        if self.error is not None:
            raise self.error
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        self.error = error
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)
        if self.transport is not None:
            self.transport.close()


class UpstreamHTTP:
    """A pool of kept-alive connections to one upstream (`base_url`, e.g. http://host:8101/v1), for one event loop."""

    def __init__(self, base_url: str, headers: dict[str, str], max_connections: int, connect_timeout_s: float,
                 read_timeout_s: float) -> None:
        url = urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"an upstream URL must be http:// or https://, got {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.prefix = url.path
        host_header = url.netloc.rsplit("@", 1)[-1]
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = f"Host: {host_header}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n{extra}"
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: deque[_Connection] = deque()
        self._slots = asyncio.Semaphore(max_connections)

    async def post_stream(self, path: str, body: bytes) -> AsyncGenerator[bytes, None]:
        """POST `body` to base_url + `path`; yields the 200 answer's body as it comes. Raises UpstreamStatus for
        another status (before any yield), UpstreamHTTPError for a failed connection or a timeout."""
        request = (f"POST {self.prefix}{path} HTTP/1.1\r\n{self._head}Content-Length: {len(body)}\r\n\r\n"
                   .encode("latin-1") + body)
        async with self._slots:
            connection = await self._send(request)
            try:
                refused: list[bytes] | None = [] if connection.status != 200 else None  # read whole, then raised
                while True:
                    if connection.chunks:
                        if refused is None:
                            yield connection.take()
                        else:
                            refused.append(connection.take())
                    elif connection.complete:
                        break
                    else:
                        await self._wait(connection)
                if refused is not None:
                    raise UpstreamStatus(connection.status, b"".join(refused))
            except BaseException:
                connection.close()  # left mid-answer: the connection's state is unknown
                raise
            if connection.keep_alive and not connection.closed:
                self._idle.append(connection)
            else:
                connection.close()

    async def _send(self, request: bytes) -> _Connection:
        """A connection with `request` sent and the answer's headers read. A pooled connection that fails before
        the first byte back was closed by the upstream while idle: the request goes once more on a new one."""
        while self._idle:
            connection = self._idle.pop()
            if connection.closed:
                continue
            connection.begin(request)
            try:
                await self._headers(connection)
                return connection
            except BaseException as e:
                # Stale: the upstream closed it before a byte of the answer. Not a timeout (the upstream may be
                # working on the request), a cancellation or a bad answer.
                stale = isinstance(e, UpstreamHTTPError) and connection.closed and not connection.received_any
                connection.close()  # a cancelled request too: its connection is in no pool and mid-exchange
                if not stale:
                    raise
        connection = await self._connect()
        connection.begin(request)
        try:
            await self._headers(connection)
        except BaseException:
            connection.close()
            raise
        return connection

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
        except (OSError, TimeoutError) as e:
            raise UpstreamHTTPError(f"cannot connect to {self.host}:{self.port}: {type(e).__name__}: {e}") from e
        return connection

    async def _headers(self, connection: _Connection) -> None:
        while not connection.headers_done:
            await self._wait(connection)

    async def _wait(self, connection: _Connection) -> None:
        try:
            async with asyncio.timeout(self.read_timeout_s):
                await connection.wait()
        except TimeoutError as e:
            raise UpstreamHTTPError(f"no answer from {self.host}:{self.port} in {self.read_timeout_s:g} s") from e

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
