"""batchrun's HTTP/1.1 client transport: keep-alive connections on asyncio protocols.

An `httpx.AsyncBaseTransport`: batchrun keeps httpx's `Request`, `Response`,
exceptions and decoders, and replaces the stack under them (httpcore's pool,
h11, anyio) for direct connections. At concurrency 64 against a fast service
that stack was the client's bottleneck (docs/performance.md): two pool scans
per request, each probing every idle socket with two syscalls, a cancel scope
per read and write, and h11's general-purpose state machine. batchrun's
requests are small JSON calls and streamed file bodies; this module does
what they need and no more:

* a pool of at most `max_connections`, idle connections reused newest first
  while younger than `keepalive_expiry` and not closed by the server (the
  event loop reads eagerly, so "did the server close it?" is a field lookup);
* a request is one `write` of head and body (bytes), or the head then the
  chunks of a streamed body (Content-Length given, else chunked encoding);
* responses: Content-Length, chunked or read-to-close bodies, interim 1xx
  responses skipped, no body for HEAD/204/304; reading pauses above
  `READ_HIGH_WATER` unread bytes, writing waits on the socket's flow control.

Errors are httpx's, with the meaning batchrun's retry policy relies on:
ConnectError/ConnectTimeout/PoolTimeout only when no byte of the request was
written (safe to resend anything); after that, WriteError, ReadError,
ReadTimeout or RemoteProtocolError (ambiguous for a create). Proxies are not
handled here: `httppool.HttpPool` routes proxied origins to httpx's own
transport.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import httpx

READ_HIGH_WATER = 1 << 20  # pause reading with this much unread
READ_LOW_WATER = 256 << 10  # and resume below this
MAX_HEAD_BYTES = 64 << 10  # status line and headers of one response
KEEPALIVE_EXPIRY_S = 4.0  # below the 5 s idle timeout common to servers (uvicorn, nginx)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")

Origin = tuple[str, str, int]


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; the event loop fills `buffer` as data arrives."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.closed = False
        self.lost: Exception | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.idle_since = 0.0
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and not self.reading_paused and self.transport:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # close: a half-closed HTTP connection is finished

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer()

    def _wake_reader(self) -> None:
        waiter, self._read_waiter = self._read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- use ------------------------------------------------------------------

    def healthy(self) -> bool:
        """Not closed or half-closed by the server, nothing unsolicited buffered."""
        return (
            not self.closed
            and not self.eof
            and not self.buffer
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

    async def write(self, data: bytes | bytearray | memoryview, timeout: float | None) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise httpx.WriteError(_lost_text(self.lost, "connection closed while sending"))
        self.transport.write(data)
        while self.writing_paused and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self._write_waiter = waiter
            await _wait(waiter, timeout, httpx.WriteTimeout)
        if self.closed:
            raise httpx.WriteError(_lost_text(self.lost, "connection closed while sending"))

    async def fill(self, timeout: float | None) -> bool:
        """Wait for more data; False at end of stream. Raises ReadError/ReadTimeout."""
        while not self.buffer:
            if self.eof or self.closed:
                if self.lost is not None:
                    raise httpx.ReadError(_lost_text(self.lost, "connection lost"))
                return False
            waiter = asyncio.get_running_loop().create_future()
            self._read_waiter = waiter
            await _wait(waiter, timeout, httpx.ReadTimeout)
        return True

    def take(self, n: int) -> bytes:
        """Up to n buffered bytes (resumes reading once the buffer has drained)."""
        if n >= len(self.buffer):
            data = bytes(self.buffer)
            self.buffer.clear()
        else:
            data = bytes(self.buffer[:n])
            del self.buffer[:n]
        if self.reading_paused and len(self.buffer) < READ_LOW_WATER and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()
        return data


def _lost_text(exc: BaseException | None, default: str) -> str:
    if exc is None:
        return default
    return str(exc) or type(exc).__name__


async def _wait(
    waiter: asyncio.Future[None], timeout: float | None, error: type[Exception]
) -> None:
    """Await `waiter`; after `timeout` s it fails with `error` (a cancellation stays one)."""
    if timeout is None:
        await waiter
        return
    timer = asyncio.get_running_loop().call_later(timeout, _expire, waiter, error, timeout)
    try:
        await waiter
    finally:
        timer.cancel()


def _expire(waiter: asyncio.Future[None], error: type[Exception], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(error(f"no progress in {timeout:g} s"))


class _Head:
    __slots__ = ("headers", "keep_alive", "reason", "status")

    def __init__(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.keep_alive = keep_alive


def _parse_head(block: bytes) -> _Head:
    lines = block.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3:
        raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:80]!r}") from None
    headers: list[tuple[bytes, bytes]] = []
    connection = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise httpx.RemoteProtocolError(f"malformed header line {line[:80]!r}")
        value = value.strip(b" \t")
        headers.append((name, value))
        if name.lower() == b"connection":
            connection += b"," + value.lower()
    keep_alive = parts[0] == b"HTTP/1.1" and b"close" not in connection
    return _Head(status, parts[2] if len(parts) > 2 else b"", headers, keep_alive)


async def _read_head(conn: _Connection, timeout: float | None) -> _Head:
    start = 0
    while True:
        end = conn.buffer.find(b"\r\n\r\n", start)
        if end >= 0:
            block = conn.take(end + 4)[:-4]
            return _parse_head(block)
        if len(conn.buffer) > MAX_HEAD_BYTES:
            raise httpx.RemoteProtocolError(f"response head over {MAX_HEAD_BYTES} bytes")
        start = max(0, len(conn.buffer) - 3)
        if not await conn.fill(timeout):
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")


def _framing(head: _Head, method: str) -> tuple[str, int]:
    """('none'|'length'|'chunked'|'close', length)."""
    if method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return "none", 0
    lengths: list[bytes] = []
    chunked = False
    for name, value in head.headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            codings = [c.strip() for c in value.lower().split(b",") if c.strip()]
            if codings and codings[-1] != b"chunked":
                raise httpx.RemoteProtocolError(f"unsupported Transfer-Encoding {value!r}")
            chunked = chunked or bool(codings)
        elif lname == b"content-length":
            lengths.extend(v.strip() for v in value.split(b","))
    if chunked:
        return "chunked", 0
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            raise httpx.RemoteProtocolError(f"bad Content-Length {lengths!r}")
        return "length", int(lengths[0])
    return "close", 0


class _Body(httpx.AsyncByteStream):
    """A response body, read from its connection as the caller iterates."""

    def __init__(
        self,
        pool: Http11Transport,
        conn: _Connection,
        framing: str,
        length: int,
        keep_alive: bool,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._framing = framing
        self._length = length
        self._keep_alive = keep_alive and framing != "close"
        self._timeout = timeout
        self._complete = framing == "none" or (framing == "length" and length == 0)
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._complete:
            return
        try:
            if self._framing == "length":
                async for chunk in self._by_length():
                    yield chunk
            elif self._framing == "chunked":
                async for chunk in self._chunked():
                    yield chunk
            else:
                async for chunk in self._to_close():
                    yield chunk
            self._complete = True
        except BaseException:
            self._release()
            raise

    async def _by_length(self) -> AsyncIterator[bytes]:
        conn, left, got = self._conn, self._length, 0
        while left:
            if not conn.buffer and not await conn.fill(self._timeout):
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    f"(received {got} bytes, expected {self._length})"
                )
            data = conn.take(left)
            left -= len(data)
            got += len(data)
            yield data

    async def _to_close(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while conn.buffer or await conn.fill(self._timeout):
            yield conn.take(len(conn.buffer))

    async def _line(self) -> bytes:
        conn = self._conn
        while True:
            end = conn.buffer.find(b"\r\n")
            if end >= 0:
                return conn.take(end + 2)[:-2]
            if len(conn.buffer) > MAX_HEAD_BYTES:
                raise httpx.RemoteProtocolError("chunk size line too long")
            if not await conn.fill(self._timeout):
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    "(incomplete chunked encoding)"
                )

    async def _chunked(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            size_text = (await self._line()).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while await self._line():  # trailers, up to the empty line
                    pass
                return
            left = size
            while left:
                if not conn.buffer and not await conn.fill(self._timeout):
                    raise httpx.RemoteProtocolError(
                        "peer closed connection without sending complete message body "
                        "(incomplete chunked encoding)"
                    )
                data = conn.take(left)
                left -= len(data)
                yield data
            if await self._line():
                raise httpx.RemoteProtocolError("chunk not followed by CRLF")

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        reuse = self._complete and self._keep_alive and not self._conn.buffer
        self._pool._release(self._conn, reuse=reuse)


class Http11Transport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float = KEEPALIVE_EXPIRY_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._max = max_connections
        self._expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0  # connections open or being opened (idle included)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        origin = (scheme, url.host, url.port or _DEFAULT_PORTS[scheme])
        head, body = _serialize(request)
        read_timeout = timeouts.get("read")
        conn = await self._acquire(origin, timeouts)
        try:
            try:
                if body is None:
                    await conn.write(head, timeouts.get("write"))
                    await _send_stream(conn, request, timeouts.get("write"))
                else:
                    await conn.write(head + body, timeouts.get("write"))
            except httpx.WriteError as exc:
                # A server may answer and close before reading the whole body (a
                # refused or expired upload URL): its answer says why.
                try:
                    response_head = await _read_head(conn, read_timeout)
                except httpx.HTTPError:
                    raise exc from None
            else:
                response_head = await _read_head(conn, read_timeout)
            while 100 <= response_head.status < 200 and response_head.status != 101:
                response_head = await _read_head(conn, read_timeout)  # interim: skip
        except BaseException:
            self._release(conn, reuse=False)
            raise
        framing, length = _framing(response_head, request.method)
        stream = _Body(self, conn, framing, length, response_head.keep_alive, read_timeout)
        if framing == "none":
            stream._release()
        return httpx.Response(
            response_head.status,
            headers=response_head.headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response_head.reason},
        )

    async def _acquire(self, origin: Origin, timeouts: dict[str, float | None]) -> _Connection:
        if self._closed:
            raise httpx.ConnectError("transport is closed")
        deadline = None
        pool_timeout = timeouts.get("pool")
        if pool_timeout is not None:
            deadline = time.monotonic() + pool_timeout
        while True:
            now = time.monotonic()
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()  # newest first: the least likely to have expired
                if conn.healthy() and now - conn.idle_since < self._expiry:
                    return conn
                self._discard(conn)
            if self._open >= self._max:
                self._close_one_idle()  # another origin's idle connection makes room
            if self._open < self._max:
                self._open += 1
                try:
                    return await self._connect(origin, timeouts.get("connect"))
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                left = None if deadline is None else max(0.0, deadline - now)
                await _wait(waiter, left, httpx.PoolTimeout)
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake_one()  # woken, then cancelled: pass the turn on
                raise

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context()
            tls = self._ssl_context
        try:
            async with asyncio.timeout(timeout):
                # asyncio sets TCP_NODELAY on TCP sockets itself.
                _, conn = await loop.create_connection(
                    lambda: _Connection(origin),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls else None,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(
                f"connecting to {host}:{port} took over {timeout:g} s"
            ) from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    def _release(self, conn: _Connection, *, reuse: bool) -> None:
        if reuse and not self._closed and conn.healthy():
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            self._discard(conn)
        self._wake_one()

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open -= 1

    def _close_one_idle(self) -> None:
        oldest: _Connection | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is not None:
            self._idle[oldest.origin].remove(oldest)
            self._discard(oldest)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                self._discard(conn)
        self._idle.clear()


def _serialize(request: httpx.Request) -> tuple[bytes, bytes | None]:
    """The request head, and the body when it is in memory (None: a stream)."""
    out = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise httpx.LocalProtocolError(f"invalid header {name[:40]!r}")
        out += [name, b": ", value, b"\r\n"]
    out.append(b"\r\n")
    head = b"".join(out)
    if _BAD_VALUE.search(out[2]) or b" " in out[2]:
        raise httpx.LocalProtocolError("invalid request target")
    stream = request.stream
    if isinstance(stream, httpx.ByteStream):
        return head, request.content
    return head, None


async def _send_stream(conn: _Connection, request: httpx.Request, timeout: float | None) -> None:
    chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
    stream: Any = request.stream
    async for chunk in stream:
        if not chunk:
            continue
        if chunked:
            await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), timeout)
        else:
            await conn.write(chunk, timeout)
    if chunked:
        await conn.write(b"0\r\n\r\n", timeout)
