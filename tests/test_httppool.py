"""batchrun's HTTP layer (httppool + http11) against real loopback servers.

The servers here are raw asyncio sockets speaking HTTP/1.1 by hand, so each
test controls exactly what a server does: keep a connection, close it while
idle, never answer, stream a large body.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchrun.client import ApiClient
from batchrun.http11 import READ_HIGH_WATER, Http11Transport
from batchrun.httppool import HttpPool, _proxy_for
from batchrun.model import Limits
from batchrun.transfer import StorageClient

TIMEOUT = httpx.Timeout(5.0)


def aio(fn: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    @functools.wraps(fn)
    def run() -> None:
        asyncio.run(fn())

    return run


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]], Awaitable[bool]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0], body


def _response(body: bytes, status: str = "200 OK") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


class Server:
    """A loopback HTTP/1.1 server; `handler` answers one request, returns keep-alive."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.open_now = 0
        self.peak_open = 0
        self.requests: list[str] = []
        self.state: dict[str, Any] = {}
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        try:
            while True:
                try:
                    line, body = await _read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests.append(line)
                self.state["body"] = body
                if not await self.handler(reader, writer, self.state):
                    return
        finally:
            self.open_now -= 1
            writer.close()


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, s: dict[str, Any]) -> bool:
    writer.write(_response(b'{"ok":true}'))
    await writer.drain()
    return True


def pool(max_connections: int = 8) -> HttpPool:
    return HttpPool(timeout=TIMEOUT, max_connections=max_connections)


@aio
async def test_keep_alive_reuses_one_connection() -> None:
    async with Server(ok) as server:
        http = pool()
        for _ in range(20):
            r = await http.send(http.request("GET", server.url + "/x"))
            assert r.status_code == 200 and r.json() == {"ok": True}
        await http.aclose()
    assert server.connections == 1
    assert len(server.requests) == 20


def delayed(seconds: float) -> Handler:
    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: dict[str, Any]) -> bool:
        await asyncio.sleep(seconds)
        return await ok(r, w, s)

    return slow


@aio
async def test_concurrency_bounded_by_max_connections() -> None:
    async with Server(delayed(0.02)) as server:
        http = pool(max_connections=4)
        rs = await asyncio.gather(
            *(http.send(http.request("GET", f"{server.url}/{i}")) for i in range(40))
        )
        await http.aclose()
    assert [r.status_code for r in rs] == [200] * 40
    assert server.peak_open <= 4
    assert server.connections == 4  # kept alive and reused, never reconnected


@aio
async def test_connection_closed_by_server_while_idle_is_not_reused() -> None:
    """A POST must not be sent on a connection the server already closed: it would fail
    ambiguously (create-run can't be resent blindly). The idle probe sees the close."""

    async def once(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: dict[str, Any]) -> bool:
        await ok(r, w, s)
        return False  # close after each answer, without saying Connection: close

    async with Server(once) as server:
        http = pool()
        for i in range(5):
            r = await http.send(http.request("POST", f"{server.url}/runs", content=b"{}"))
            assert r.status_code == 200, i
            await asyncio.sleep(0.05)  # the server's FIN arrives while idle
        await http.aclose()
    assert server.connections == 5


@aio
async def test_read_timeout_when_server_never_answers() -> None:
    async def mute(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: dict[str, Any]) -> bool:
        await asyncio.sleep(30)
        return False

    async with Server(mute) as server:
        http = HttpPool(timeout=httpx.Timeout(5.0, read=0.3), max_connections=2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(httpx.ReadTimeout):
            await http.send(http.request("GET", server.url))
        assert 0.25 < loop.time() - start < 3
        await http.aclose()


@aio
async def test_connect_refused_is_connect_error() -> None:
    async with Server(ok) as server:
        url = server.url
    http = pool()
    with pytest.raises(httpx.ConnectError):
        await http.send(http.request("GET", url))
    await http.aclose()


def big_body(block: bytes, blocks: int) -> Handler:
    """Answers every request with `blocks` copies of `block`, written as fast as allowed."""

    async def big(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: dict[str, Any]) -> bool:
        w.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(block) * blocks}\r\n\r\n".encode())
        for _ in range(blocks):
            w.write(block)
            await w.drain()
        return True

    return big


@aio
async def test_large_streamed_download_with_slow_reader() -> None:
    size = 24 << 20
    block = os.urandom(1 << 20)

    async with Server(big_body(block, size // len(block))) as server:
        http = pool()
        response = await http.send(http.request("GET", server.url), stream=True)
        digest = hashlib.sha256()
        got = 0
        async for chunk in response.aiter_raw():
            digest.update(chunk)
            got += len(chunk)
            await asyncio.sleep(0.001)  # slower than loopback: reading must pause
        await response.aclose()
        await http.aclose()
    assert got == size
    assert digest.hexdigest() == hashlib.sha256(block * (size // len(block))).hexdigest()


@aio
async def test_reading_pauses_above_high_water() -> None:
    """A body nobody reads buffers at most ~READ_HIGH_WATER (+ one socket read)."""
    size = 16 << 20

    async with Server(big_body(b"x" * (1 << 20), 16)) as server:
        http = pool()
        response = await http.send(http.request("GET", server.url), stream=True)
        await asyncio.sleep(0.5)  # the server writes as fast as it may; nobody reads
        conn = response.stream._conn  # type: ignore[attr-defined]
        assert conn.reading_paused
        assert READ_HIGH_WATER < len(conn.buffer) <= READ_HIGH_WATER + (1 << 20)
        total = 0
        async for chunk in response.aiter_raw():
            total += len(chunk)
        await response.aclose()
        await http.aclose()
    assert total == size


@aio
async def test_streamed_upload_body_arrives_whole() -> None:
    async with Server(ok) as server:
        http = pool()
        parts = [os.urandom(1 << 20) for _ in range(8)]

        async def body() -> AsyncIterator[bytes]:
            for p in parts:
                yield p

        size = str(sum(map(len, parts)))
        req = http.request(
            "PUT", server.url + "/up", content=body(), headers={"Content-Length": size}
        )
        r = await http.send(req)
        await http.aclose()
    assert r.status_code == 200
    assert server.state["body"] == b"".join(parts)


@aio
async def test_clients_use_batchrun_transport_directly() -> None:
    async with Server(ok) as server:
        api = ApiClient(server.url, "k", limits=Limits())
        storage = StorageClient()
        for http in (api._http, storage._http):
            assert isinstance(http._transport_for(httpx.URL(server.url)), Http11Transport)
        await api.aclose()
        await storage.aclose()


def test_environment_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "internal.corp")
    assert _proxy_for(httpx.URL("https://api.cloud.nextmv.io/v1")) == "http://proxy.corp:3128"
    assert _proxy_for(httpx.URL("http://api.cloud.nextmv.io/v1")) is None  # no HTTP_PROXY
    assert _proxy_for(httpx.URL("https://x.internal.corp/")) is None
    assert _proxy_for(httpx.URL("https://127.0.0.1:8080/")) is None  # loopback: never
    assert _proxy_for(httpx.URL("https://localhost:8080/")) is None


# -- response framing and protocol edges (http11) --------------------------------


def raw_answer(data: bytes, keep: bool = True) -> Handler:
    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: dict[str, Any]) -> bool:
        w.write(data)
        await w.drain()
        return keep

    return answer


async def _get(url: str, method: str = "GET") -> httpx.Response:
    http = pool()
    try:
        return await http.send(http.request(method, url))
    finally:
        await http.aclose()


@aio
async def test_chunked_body_with_extensions_and_trailers() -> None:
    body = b'5;ext=1\r\n{"a":\r\n3\r\n 1}\r\n0\r\nX-Trailer: t\r\n\r\n'
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with Server(raw_answer(head + body)) as server:
        http = pool()
        for _ in range(3):  # and the connection stays usable after each
            r = await http.send(http.request("GET", server.url))
            assert r.json() == {"a": 1}
        await http.aclose()
    assert server.connections == 1


@aio
async def test_body_read_to_close_and_connection_close() -> None:
    async with Server(raw_answer(b"HTTP/1.1 200 OK\r\n\r\nall of it", keep=False)) as server:
        r = await _get(server.url)
    assert r.content == b"all of it"
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with Server(raw_answer(head, keep=False)) as server:
        http = pool()
        for _ in range(3):
            assert (await http.send(http.request("GET", server.url))).content == b"ok"
        await http.aclose()
    assert server.connections == 3  # never reused after Connection: close


@aio
async def test_no_body_statuses_and_interim_responses() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    async with Server(raw_answer(answer)) as server:
        http = pool()
        for _ in range(2):
            r = await http.send(http.request("POST", server.url, content=b"{}"))
            assert r.status_code == 204 and r.content == b""
        r = await http.send(http.request("HEAD", server.url))
        await http.aclose()
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"SPDY/3 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"",
    ],
)
def test_malformed_or_cut_responses_are_protocol_errors(answer: bytes) -> None:
    async def go() -> None:
        async with Server(raw_answer(answer, keep=False)) as server:
            with pytest.raises(httpx.RemoteProtocolError):
                await _get(server.url)

    asyncio.run(go())


@aio
async def test_early_answer_to_a_streamed_upload_is_returned() -> None:
    """A storage URL that expired mid-upload answers 403 and closes: the 403 (which
    tells batchrun to fetch a new URL) must come back, not a bare write error."""

    async def refuse(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 7\r\nConnection: close\r\n\r\nexpired")
        await w.drain()
        w.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"x" * (1 << 20)
            await asyncio.sleep(0)

    http = pool()
    req = http.request(
        "PUT",
        f"http://127.0.0.1:{port}/up",
        content=body(),
        headers={"Content-Length": str(64 << 20)},
    )
    r = await http.send(req)
    await http.aclose()
    server.close()
    assert r.status_code == 403 and r.content == b"expired"


@aio
async def test_pool_timeout_when_every_connection_is_busy() -> None:
    async with Server(delayed(1.0)) as server:
        http = HttpPool(timeout=httpx.Timeout(5.0, pool=0.2), max_connections=1)
        first = asyncio.ensure_future(http.send(http.request("GET", server.url)))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await http.send(http.request("GET", server.url))
        assert (await first).status_code == 200
        await http.aclose()


@aio
async def test_header_injection_is_refused_before_sending() -> None:
    async with Server(ok) as server:
        http = pool()
        bad = http.request("GET", server.url, headers={"Authorization": "Bearer k\r\nX-Evil: 1"})
        with pytest.raises(httpx.LocalProtocolError):
            await http.send(bad)
        await http.aclose()
    assert server.requests == []


@aio
async def test_https_to_a_plain_server_is_a_connect_error() -> None:
    async def plain(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await _get(f"https://127.0.0.1:{port}/")
    server.close()


# -- TLS (the real service is https) ------------------------------------------------


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the openssl command line makes it)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_https_keep_alive_streaming_and_verification(tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    size = 8 << 20
    connections = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                _, body = await _read_request(r)
                if body:  # an upload: answer with its digest
                    reply = hashlib.sha256(body).hexdigest().encode()
                    w.write(_response(reply))
                else:  # a download: a large body through TLS flow control
                    w.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
                    w.write(b"z" * size)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def go() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        url = f"https://127.0.0.1:{port}/x"
        trusting = Http11Transport(
            max_connections=2, ssl_context=ssl.create_default_context(cafile=str(cert))
        )
        http = HttpPool(timeout=TIMEOUT, max_connections=2, transport=trusting)
        payload = os.urandom(3 << 20)
        for _ in range(3):
            r = await http.send(http.request("POST", url, content=payload))
            assert r.text == hashlib.sha256(payload).hexdigest()
            r = await http.send(http.request("GET", url))
            assert len(r.content) == size
        await http.aclose()
        assert len(connections) == 1  # one TLS connection, kept alive for all six
        # The default context (system CAs) must refuse the self-signed certificate.
        untrusting = pool()
        with pytest.raises(httpx.ConnectError):
            await untrusting.send(untrusting.request("GET", url))
        await untrusting.aclose()
        server.close()

    asyncio.run(go())
