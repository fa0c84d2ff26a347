"""httpcore's network layer on plain asyncio protocols: batchrun's sockets.

httpcore reaches asyncio through anyio by default: a cancel scope and a
`fail_after` per read and per write, and a `poll` plus a `getpeername`
syscall each time the pool asks whether an idle connection was closed by the
server. At batchrun's request rates that layer was ~15% of apply's CPU
(docs/performance.md). This backend implements httpcore's public
`AsyncNetworkBackend` interface on an `asyncio.Protocol`:

* the event loop reads eagerly into the protocol's buffer, so "is the idle
  connection readable (closed by the server)?" is a field lookup;
* a read or write arms one timer only when it actually has to wait;
* reading pauses above `READ_HIGH_WATER` buffered bytes (a slow consumer of a
  large download never buffers more), writing waits on the transport's own
  flow control (`pause_writing`/`resume_writing`).

Errors are httpcore's (ConnectError, ReadTimeout, ...), which httpx maps to
its own exactly as it does for the default backend.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from typing import Any

import httpcore

READ_HIGH_WATER = 1 << 20  # pause reading with this much unread
READ_LOW_WATER = 256 << 10  # and resume below this


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.lost: Exception | None = None
        self.closed = False
        self.reading_paused = False
        self.writing_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_HIGH_WATER and not self.reading_paused and self.transport:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake_reader()
        return False  # close the transport: a half-closed HTTP connection is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = exc
        self._wake_reader()
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        waiter, self._write_waiter = self._write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_reader(self) -> None:
        waiter, self._read_waiter = self._read_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- waiting --------------------------------------------------------------

    async def wait_readable(self, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._read_waiter = waiter
        await _wait(waiter, timeout, httpcore.ReadTimeout)

    async def wait_writable(self, timeout: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._write_waiter = waiter
        await _wait(waiter, timeout, httpcore.WriteTimeout)


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


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, protocol: _Protocol) -> None:
        self._p = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        p = self._p
        while not p.chunks:
            if p.closed or p.eof:
                if p.lost is not None:
                    raise httpcore.ReadError(str(p.lost) or type(p.lost).__name__)
                return b""
            await p.wait_readable(timeout)
        data = p.chunks.popleft()
        if len(data) > max_bytes:
            p.chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        p.buffered -= len(data)
        if p.reading_paused and p.buffered < READ_LOW_WATER and p.transport is not None:
            p.reading_paused = False
            p.transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        p = self._p
        if p.closed or p.transport is None or p.transport.is_closing():
            raise httpcore.WriteError("connection closed")
        p.transport.write(buffer)
        while p.writing_paused and not p.closed:
            await p.wait_writable(timeout)
        if p.closed:
            raise httpcore.WriteError(str(p.lost or "connection closed"))

    async def aclose(self) -> None:
        transport = self._p.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        transport = self._p.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                tls = await loop.start_tls(
                    transport, self._p, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError as exc:
            transport.close()
            raise httpcore.ConnectTimeout(f"TLS handshake took over {timeout:g} s") from exc
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            transport.close()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        if tls is None:
            raise httpcore.ConnectError("TLS handshake failed: connection closed")
        assert isinstance(tls, asyncio.Transport)
        self._p.transport = tls
        return self

    def get_extra_info(self, info: str) -> Any:
        p = self._p
        if info == "is_readable":
            # Readable while idle means the server closed (or broke) the connection.
            return bool(p.chunks) or p.eof or p.closed
        transport = p.transport
        if transport is None:
            return None
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        if info == "socket":
            return transport.get_extra_info("socket")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        local = (local_address, 0) if local_address else None
        try:
            async with asyncio.timeout(timeout):
                # asyncio sets TCP_NODELAY on TCP sockets itself.
                _, protocol = await loop.create_connection(_Protocol, host, port, local_addr=local)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connecting took over {timeout:g} s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        _apply_options(protocol, socket_options)
        return AsyncioStream(protocol)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_unix_connection(_Protocol, path)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connecting took over {timeout:g} s") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        _apply_options(protocol, socket_options)
        return AsyncioStream(protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _apply_options(protocol: _Protocol, options: Iterable[Any] | None) -> None:
    if not options or protocol.transport is None:
        return
    sock: socket.socket | None = protocol.transport.get_extra_info("socket")
    if sock is not None:
        for option in options:
            sock.setsockopt(*option)
