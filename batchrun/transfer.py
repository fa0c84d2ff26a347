"""Streaming PUT/GET to presigned storage URLs, atomic file writes, URL redaction.

Presigned URLs are credentials: they never appear in a log line, an exception
message or a repr — only `redact_url(url)` (origin and path) does. The storage
client has no Authorization header and follows no redirect.

Uploads stream the file in chunks with an exact Content-Length (constant
memory whatever the size). Downloads stream into a temp file beside the
destination, check size and hash, fsync, rename over the destination and fsync
the folder: the destination only ever holds a complete file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from batchrun.errors import ApiError, DiskError, TransferError
from batchrun.httppool import HttpPool
from batchrun.retry import (
    RetryBudget,
    RetryPolicy,
    TransientError,
    call_with_retry,
    describe_exception,
    scrub,
)

log = logging.getLogger(__name__)

DEFAULT_STORAGE_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=120.0, pool=120.0)
# Outputs up to this size are read whole and written in one thread hop.
SMALL_OUTPUT_BYTES = 256 << 10
ERROR_BODY_MAX_BYTES = 4096  # how much of an error response body is kept for the message
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


def redact_url(url: str | httpx.URL) -> str:
    """scheme://host[:port]/path — user info, query and fragment dropped (signatures live there)."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid url>"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{netloc}{parts.path}"


class _RedactUrlsFilter(logging.Filter):
    """httpx logs every request URL at INFO, query string included: redact it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_url(a) if isinstance(a, httpx.URL) else scrub(a) if isinstance(a, str) else a
                for a in record.args
            )
        if isinstance(record.msg, str):
            record.msg = scrub(record.msg)
        return True


def _install_log_redaction() -> None:
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactUrlsFilter) for f in logger.filters):
            logger.addFilter(_RedactUrlsFilter())


_install_log_redaction()


def _content_type(path: Path) -> str:
    return "application/json" if path.suffix.lower() == ".json" else "application/octet-stream"


def _error_excerpt(body: bytes) -> str:
    text = body[:ERROR_BODY_MAX_BYTES].decode("utf-8", "replace")
    return scrub(" ".join(text.split()))[:300]


def _disk_error(exc: OSError, folder: Path, needed: int | None) -> DiskError:
    need = f" (needs {needed:,} bytes)" if needed is not None else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskError(f"no space left in {folder}{need}: free some space and apply again")
    return DiskError(f"cannot write in {folder}{need}: {exc.strerror or exc}")


def _check_dest(dest: Path) -> None:
    """Refuse a destination that is a symlink or not a regular file (nothing written through it)."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DiskError(f"cannot inspect output {dest}: {exc.strerror or exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise DiskError(f"output {dest} is a symbolic link: refusing to write through it")
    if not stat.S_ISREG(st.st_mode):
        raise DiskError(f"output {dest} exists and is not a regular file")


class _TempFile:
    """A new file beside `dest`, created with O_EXCL|O_NOFOLLOW; removed unless committed.

    Its name is fixed per destination (`.<name>.batchrun.part`), so the leftover
    of a process killed mid-download is replaced by the next attempt instead of
    piling up. One writer per destination is assumed (apply holds the state
    lock; outputs are unique): the old entry is unlinked (a link itself, never
    its target), then the new file is made with O_EXCL.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.folder = dest.parent
        self.path = self.folder / f".{dest.name}.batchrun.part"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd: int | None = os.open(self.path, flags, 0o644)
        self.size = 0
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += len(data)
        self.sha.update(data)

    def commit(self) -> None:
        """fsync the file, rename it over dest, fsync the folder."""
        assert self.fd is not None
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        _check_dest(self.dest)  # re-checked: a link could have appeared meanwhile
        os.replace(self.path, self.dest)
        _fsync_dir(self.folder)

    def discard(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StorageClient:
    """Uploads and downloads against presigned URLs (no Authorization, no redirects)."""

    def __init__(
        self,
        *,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 (frozen: safe as a default)
        timeout: httpx.Timeout = DEFAULT_STORAGE_TIMEOUT,
        max_connections: int = 16,
        chunk_bytes: int = 4 << 20,  # measured: 1.05x a raw httpx PUT, 1.09x with 1 MiB
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.policy = policy
        self.budget = RetryBudget(policy.budget)
        self.chunk_bytes = chunk_bytes
        self._http = HttpPool(timeout=timeout, max_connections=max_connections, transport=transport)
        self.bytes_up = 0
        self.bytes_down = 0

    def __repr__(self) -> str:
        return f"StorageClient(retries={self.budget.spent})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> StorageClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- upload ---------------------------------------------------------------

    async def _chunks(
        self,
        path: Path,
        size: int,
        on_progress: Callable[[int], None] | None,
    ) -> AsyncIterator[bytes]:
        f = await asyncio.to_thread(open, path, "rb")
        try:
            sent = 0
            while sent < size:
                chunk = await asyncio.to_thread(f.read, min(self.chunk_bytes, size - sent))
                if not chunk:
                    raise TransferError(f"input {path} changed during upload (it shrank)")
                sent += len(chunk)
                if on_progress is not None:
                    on_progress(sent)
                yield chunk
        finally:
            f.close()

    async def put_file(
        self,
        url: str,
        path: Path,
        *,
        size: int,
        on_progress: Callable[[int], None] | None = None,
    ) -> None:
        """Stream `path` (exactly `size` bytes) to a presigned URL.

        `on_progress(n)` gets the bytes sent so far in the current attempt (0 again on a retry).
        Raises TransferError(expired=True) on a 403 (expired or refused URL: get a new one).
        """
        what = f"PUT {redact_url(url)}"
        try:
            before = os.stat(path)
        except OSError as exc:
            raise TransferError(f"cannot read input {path}: {exc.strerror or exc}") from exc
        if before.st_size != size:
            raise TransferError(f"input {path} changed since it was planned ({size:,} bytes then)")
        headers = {"Content-Length": str(size), "Content-Type": _content_type(path)}

        async def send() -> httpx.Response:
            request = self._http.request(
                "PUT", url, content=self._chunks(path, size, on_progress), headers=headers
            )
            response = await self._http.send(request, stream=True)
            try:
                await _read_bounded(response)
            finally:
                await response.aclose()
            return response

        try:
            response = await call_with_retry(
                send, policy=self.policy, budget=self.budget, idempotent=True, what=what
            )
        except ApiError as exc:
            raise TransferError(exc.message, status=exc.status) from exc
        except OSError as exc:
            raise TransferError(f"cannot read input {path}: {exc.strerror or exc}") from exc
        status = response.status_code
        if status == 403:
            raise TransferError(
                f"{what}: 403 upload URL expired or refused "
                f"({_error_excerpt(response.content) or 'no detail'})",
                expired=True,
                status=403,
            )
        if not 200 <= status < 300:
            raise TransferError(
                f"{what}: {status} {response.reason_phrase}: {_error_excerpt(response.content)}",
                status=status,
            )
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise TransferError(f"input {path} changed during upload")
        self.bytes_up += size

    # -- download -------------------------------------------------------------

    async def download(
        self,
        url: str,
        dest: Path,
        *,
        max_bytes: int,
        on_progress: Callable[[int], None] | None = None,
    ) -> tuple[int, str]:
        """Stream a presigned URL to `dest` atomically; returns (size, sha256 hex).

        A body cut short is retried from the start; dest only ever holds a complete file.
        `on_progress(n)` gets the bytes received so far in the current attempt.
        """
        what = f"GET {redact_url(url)}"
        _check_dest(dest)
        folder = dest.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _disk_error(exc, folder, None) from exc
        result: list[tuple[int, str]] = []

        async def send() -> httpx.Response:
            # identity: Content-Length then counts the bytes we write.
            request = self._http.request("GET", url, headers={"Accept-Encoding": "identity"})
            response = await self._http.send(request, stream=True)
            try:
                if response.status_code != 200:
                    await _read_bounded(response)
                    return response
                result[:] = [await self._stream_to(response, dest, max_bytes, what, on_progress)]
                return response
            finally:
                await response.aclose()

        try:
            response = await call_with_retry(
                send, policy=self.policy, budget=self.budget, idempotent=True, what=what
            )
        except ApiError as exc:
            raise TransferError(exc.message, status=exc.status) from exc
        status = response.status_code
        if status != 200 or not result:
            raise TransferError(
                f"{what}: {status} {response.reason_phrase}: {_error_excerpt(response.content)}",
                expired=status == 403,
                status=status,
            )
        self.bytes_down += result[0][0]
        return result[0]

    async def _stream_to(
        self,
        response: httpx.Response,
        dest: Path,
        max_bytes: int,
        what: str,
        on_progress: Callable[[int], None] | None,
    ) -> tuple[int, str]:
        expected: int | None = None
        length = response.headers.get("content-length")
        if length is not None and length.strip().isdigit():
            expected = int(length)
        if expected is not None and expected > max_bytes:
            raise TransferError(
                f"{what}: output is {expected:,} bytes, over the {max_bytes:,} limit"
            )
        encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
        if expected is not None and expected <= SMALL_OUTPUT_BYTES and not encoded:
            return await self._small_to(response, dest, expected, on_progress)
        try:
            tmp = await asyncio.to_thread(_TempFile, dest)
        except OSError as exc:
            raise _disk_error(exc, dest.parent, expected) from exc
        try:
            chunks = response.aiter_bytes() if encoded else response.aiter_raw()
            async for chunk in chunks:
                if tmp.size + len(chunk) > max_bytes:
                    raise TransferError(f"{what}: output is over the {max_bytes:,} byte limit")
                await asyncio.to_thread(tmp.write, chunk)
                if on_progress is not None:
                    on_progress(tmp.size)
            if expected is not None and not encoded and tmp.size != expected:
                raise TransientError(f"body cut short: {tmp.size:,} of {expected:,} bytes")
            await asyncio.to_thread(tmp.commit)
        except OSError as exc:
            tmp.discard()
            raise _disk_error(exc, dest.parent, expected) from exc
        except BaseException:
            tmp.discard()
            raise
        return tmp.size, tmp.sha.hexdigest()

    async def _small_to(
        self,
        response: httpx.Response,
        dest: Path,
        expected: int,
        on_progress: Callable[[int], None] | None,
    ) -> tuple[int, str]:
        """A body of known small size: read whole, then one thread hop writes it
        (create, write, fsync, rename, folder fsync) instead of three or more."""
        body = bytearray()
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > expected:
                raise TransientError(f"body longer than its Content-Length ({expected:,} bytes)")
        if len(body) != expected:
            raise TransientError(f"body cut short: {len(body):,} of {expected:,} bytes")
        if on_progress is not None:
            on_progress(len(body))
        try:
            return await asyncio.to_thread(_write_file, dest, bytes(body))
        except OSError as exc:
            raise _disk_error(exc, dest.parent, expected) from exc


def _write_file(dest: Path, data: bytes) -> tuple[int, str]:
    """dest := data, atomically and durably; (size, sha256 hex)."""
    tmp = _TempFile(dest)
    try:
        tmp.write(data)
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise
    return tmp.size, tmp.sha.hexdigest()


async def _read_bounded(response: httpx.Response) -> None:
    """Read at most ERROR_BODY_MAX_BYTES of a (small) response body into response._content."""
    body = bytearray()
    try:
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) >= ERROR_BODY_MAX_BYTES:
                break
    except httpx.TransportError as exc:
        log.debug("error body unreadable: %s", describe_exception(exc))
    response._content = bytes(body[:ERROR_BODY_MAX_BYTES])
