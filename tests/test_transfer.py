"""batchrun.transfer against a tiny storage server on loopback (real sockets: cut
connections, streamed bodies, memory)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import socket
import threading
import tracemalloc
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from batchrun.errors import DiskError, TransferError
from batchrun.retry import RetryPolicy
from batchrun.transfer import (
    StorageClient,
    _TempFile,
    redact_url,
)

T = TypeVar("T")
FAST = RetryPolicy(max_attempts=3, base_s=0.001, cap_s=0.01)
SIG = "?X-Amz-Signature=deadbeef&sig=s3cr3t&se=2030"
MB = 1_000_000


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass
class Storage:
    url: str = ""
    seen: list[tuple[str, dict[str, str], int]] = field(
        default_factory=list
    )  # method, headers, bytes
    put_status: int = 200
    put_body: bytes = b""
    put_cuts: int = 0  # the next N PUTs read half the body then drop the connection
    get_body: bytes = b""
    get_cuts: int = 0  # the next N GETs announce the full length, send half, drop
    get_status: int = 200
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, attr: str) -> bool:
        with self.lock:
            left: int = getattr(self, attr)
            if left > 0:
                setattr(self, attr, left - 1)
                return True
            return False


def _handler(store: Storage) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _drop(self) -> None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def do_PUT(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            length = int(headers.get("content-length", "0"))
            cut = store.take("put_cuts")
            limit = length // 2 if cut else length
            got = 0
            while got < limit:
                chunk = self.rfile.read(min(1 << 16, limit - got))
                if not chunk:
                    break
                got += len(chunk)
            store.seen.append(("PUT", headers, got))
            if cut:
                self._drop()
                return
            self.send_response(store.put_status)
            self.send_header("Content-Length", str(len(store.put_body)))
            self.end_headers()
            self.wfile.write(store.put_body)

        def do_GET(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            body = store.get_body
            cut = store.take("get_cuts")
            store.seen.append(("GET", headers, 0))
            self.send_response(store.get_status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self._drop()
                return
            self.wfile.write(body)

    return H


@pytest.fixture
def storage() -> Iterator[Storage]:
    store = Storage()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(store))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    store.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield store
    finally:
        httpd.shutdown()
        httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")]


def no_sig(text: str) -> None:
    assert "sig=" not in text and "Signature" not in text and "s3cr3t" not in text


# -- redaction ------------------------------------------------------------------


def test_redact_url() -> None:
    assert redact_url("https://s.test/b/k.json" + SIG) == "https://s.test/b/k.json"
    assert redact_url("http://u:pw@127.0.0.1:9000/p#frag") == "http://127.0.0.1:9000/p"
    assert redact_url("https://[::1]:8443/x?sig=1") == "https://[::1]:8443/x"
    assert redact_url("http://[bad") == "<invalid url>"


# -- upload ---------------------------------------------------------------------


def test_put_streams_in_constant_memory(storage: Storage, tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    size = 200 * MB
    with open(path, "wb") as f:
        f.truncate(size)  # sparse: no disk used
    progress: list[int] = []

    async def main() -> None:
        async with StorageClient(policy=FAST) as client:
            await client.put_file(
                storage.url + "/up" + SIG, path, size=size, on_progress=progress.append
            )

    tracemalloc.start()
    try:
        run(main())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30 * MB, f"peak {peak / MB:.1f} MB"
    ((method, headers, got),) = storage.seen
    assert method == "PUT" and got == size and progress[-1] == size
    assert headers["content-length"] == str(size)
    assert headers["content-type"] == "application/octet-stream"
    assert "authorization" not in headers and "transfer-encoding" not in headers


def test_put_expired_is_not_retried(storage: Storage, tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_bytes(b'{"a":1}')
    storage.put_status = 403
    storage.put_body = (
        b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    )

    async def main() -> None:
        async with StorageClient(policy=FAST) as client:
            await client.put_file(storage.url + "/up" + SIG, path, size=7)

    with pytest.raises(TransferError) as info:
        run(main())
    assert info.value.expired and info.value.status == 403
    assert "Request has expired" in str(info.value)
    no_sig(str(info.value))
    assert len(storage.seen) == 1
    assert storage.seen[0][1]["content-type"] == "application/json"


def test_put_cut_mid_body_restarts_from_zero(storage: Storage, tmp_path: Path) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(os.urandom(3 * (1 << 20)))
    storage.put_cuts = 1

    async def main() -> None:
        async with StorageClient(policy=FAST, chunk_bytes=1 << 16) as client:
            await client.put_file(storage.url + "/up" + SIG, path, size=3 * (1 << 20))

    run(main())
    assert [got for _, _, got in storage.seen] == [3 * (1 << 19), 3 * (1 << 20)]


def test_put_detects_a_file_changing(storage: Storage, tmp_path: Path) -> None:
    path = tmp_path / "in.bin"
    path.write_bytes(b"x" * 300_000)

    def grow(_: int) -> None:
        with open(path, "ab") as f:
            f.write(b"y")

    async def main() -> None:
        async with StorageClient(policy=FAST, chunk_bytes=1 << 16) as client:
            await client.put_file(storage.url + "/up", path, size=300_000, on_progress=grow)

    with pytest.raises(TransferError, match="changed during upload"):
        run(main())

    path.write_bytes(b"x" * 300_000)

    def shrink(_: int) -> None:
        os.truncate(path, 1000)

    async def shrinking() -> None:
        async with StorageClient(policy=FAST, chunk_bytes=1 << 16) as client:
            await client.put_file(storage.url + "/up", path, size=300_000, on_progress=shrink)

    with pytest.raises(TransferError, match="shrank"):
        run(shrinking())

    async def wrong_size() -> None:
        async with StorageClient(policy=FAST) as client:
            await client.put_file(storage.url + "/up", path, size=1)

    with pytest.raises(TransferError, match="changed"):
        run(wrong_size())


# -- download -------------------------------------------------------------------


def _download(storage: Storage, dest: Path, max_bytes: int = 10 * MB) -> tuple[int, str]:
    async def main() -> tuple[int, str]:
        async with StorageClient(policy=FAST, chunk_bytes=1 << 16) as client:
            return await client.download(storage.url + "/out" + SIG, dest, max_bytes=max_bytes)

    return run(main())


def test_download_cut_short_is_retried_and_complete(storage: Storage, tmp_path: Path) -> None:
    storage.get_body = os.urandom(2 * (1 << 20) + 17)
    storage.get_cuts = 1
    dest = tmp_path / "out" / "result.json"
    size, sha = _download(storage, dest)
    assert dest.read_bytes() == storage.get_body
    assert (size, sha) == (len(storage.get_body), hashlib.sha256(storage.get_body).hexdigest())
    assert len(storage.seen) == 2 and leftovers(dest.parent) == []
    assert all("authorization" not in h for _, h, _ in storage.seen)
    assert storage.seen[0][1]["accept-encoding"] == "identity"


def test_download_failing_never_leaves_a_partial_file(storage: Storage, tmp_path: Path) -> None:
    storage.get_body = os.urandom(1 << 20)
    storage.get_cuts = 99
    dest = tmp_path / "result.json"
    dest.write_bytes(b"old")
    with pytest.raises(TransferError) as info:
        _download(storage, dest)
    no_sig(str(info.value))
    assert info.value.status is None
    assert len(storage.seen) == FAST.max_attempts
    assert dest.read_bytes() == b"old" and leftovers(tmp_path) == []
    dest.unlink()
    with pytest.raises(TransferError):
        _download(storage, dest)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_download_refuses_symlink_and_directory(storage: Storage, tmp_path: Path) -> None:
    storage.get_body = b"payload"
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    link = tmp_path / "out.json"
    link.symlink_to(target)
    with pytest.raises(DiskError, match="symbolic link"):
        _download(storage, link)
    assert target.read_bytes() == b"keep" and link.is_symlink()
    folder = tmp_path / "adir"
    folder.mkdir()
    with pytest.raises(DiskError, match="not a regular file"):
        _download(storage, folder)
    assert storage.seen == []


def test_download_over_max_bytes_and_expired(storage: Storage, tmp_path: Path) -> None:
    storage.get_body = b"z" * 1000
    dest = tmp_path / "o.bin"
    with pytest.raises(TransferError, match="over the 999"):
        _download(storage, dest, max_bytes=999)
    assert not dest.exists() and len(storage.seen) == 1
    storage.get_status = 403
    with pytest.raises(TransferError) as info:
        _download(storage, dest)
    assert info.value.expired and len(storage.seen) == 2


def test_disk_full_is_a_disk_error(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: _TempFile, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_TempFile, "write", full)
    storage.get_body = b"q" * 5000
    dest = tmp_path / "o.bin"
    with pytest.raises(DiskError) as info:
        _download(storage, dest)
    assert str(tmp_path) in str(info.value) and "5,000" in str(info.value)
    assert len(storage.seen) == 1  # a full disk is not retried
    assert not dest.exists() and leftovers(tmp_path) == []


def test_logs_never_hold_signatures(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    storage.get_body = b"{}"
    storage.get_cuts = 1
    _download(storage, tmp_path / "o.json")
    assert "HTTP Request" in caplog.text and "retry" in caplog.text
    no_sig(caplog.text)
