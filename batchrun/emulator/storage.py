"""The storage origin: presigned PUT (uploads) and GET (outputs) on its own port.

URLs look like ``/uploads/<id>?expires=<epoch>&sig=<hmac>``: the signature is an
HMAC-SHA256 over method, path and expiry with a per-process secret, so links
are credentials in themselves and no Authorization header is needed (any that
arrives is counted, never required). Bodies are streamed in chunks both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from batchrun.emulator.server import EmulatorState

UPLOAD_MAX_BYTES = 500 * 1000 * 1000
CHUNK = 64 * 1024
TRANSPORT_KEY = "batchrun.emulator.transport"


class Signer:
    def __init__(self, base_url: str, secret: bytes | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._secret = secret or secrets.token_bytes(32)

    def _sig(self, method: str, path: str, expires: int) -> str:
        msg = f"{method}\n{path}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def sign(self, method: str, path: str, lifetime_s: float) -> str:
        expires = int(time.time() + lifetime_s)
        query = urlencode({"expires": expires, "sig": self._sig(method, path, expires)})
        return f"{self.base_url}{path}?{query}"

    def check(self, method: str, path: str, expires: str, sig: str) -> str:
        """'' when valid, 'expired' or 'bad' otherwise (signature checked first)."""
        try:
            exp = int(expires)
        except ValueError:
            return "bad"
        if not hmac.compare_digest(self._sig(method, path, exp), sig):
            return "bad"
        return "expired" if time.time() > exp else ""


class TransportMiddleware:
    """Puts uvicorn's transport into the scope, so a handler can reset the connection.

    uvicorn passes the bound method ``RequestResponseCycle.send`` as ``send``;
    its ``transport`` is the asyncio transport of the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owner = getattr(send, "__self__", None)
        transport = getattr(owner, "transport", None)
        if transport is not None:
            scope[TRANSPORT_KEY] = transport
        await self.app(scope, receive, send)


async def reset_connection(scope: Scope) -> None:
    """Close the connection with a TCP RST and no (further) response bytes.

    SO_LINGER with a zero timeout makes close() send RST instead of FIN, and
    ``transport.abort()`` discards anything buffered. uvicorn then marks the
    cycle disconnected and sends nothing more (no 500 is written).
    """
    transport: Any = scope.get(TRANSPORT_KEY)
    if transport is None:  # not under uvicorn: the best we can do is an exception
        raise ConnectionAbortedError("emulator: injected connection reset")
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    for _ in range(3):
        await asyncio.sleep(0)


class ResetResponse(Response):
    """A 'response' that resets the connection instead of answering."""

    def __init__(self) -> None:
        super().__init__(b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await reset_connection(scope)


class FileStreamResponse(Response):
    """Streams a file with Content-Length; optionally resets after `cut_at` bytes."""

    def __init__(self, path: Path, on_bytes: Callable[[int], None], cut_at: int | None) -> None:
        super().__init__(b"", media_type="application/octet-stream")
        self.path = path
        self.size = path.stat().st_size
        self.on_bytes = on_bytes
        self.cut_at = cut_at
        self.headers["content-length"] = str(self.size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        sent = 0
        limit = self.size if self.cut_at is None else self.cut_at
        with self.path.open("rb") as f:
            while sent < limit:
                chunk = f.read(min(CHUNK, limit - sent))
                if not chunk:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
                self.on_bytes(len(chunk))
        if self.cut_at is not None:
            await asyncio.sleep(0.05)  # let the partial body reach the socket
            await reset_connection(scope)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(request: Request) -> None:
    """Read and discard the body, so the client sees our answer rather than a broken pipe."""
    total = 0
    with contextlib.suppress(ClientDisconnect):
        async for chunk in request.stream():
            total += len(chunk)
            if total > UPLOAD_MAX_BYTES:
                break


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_storage_app(state: EmulatorState) -> ASGIApp:
    def admit(request: Request, route: str, method: str) -> str:
        """Count the request (and any Authorization header: storage must never
        see one), then check the presigned signature and expiry."""
        state.count_request(route)
        if "authorization" in request.headers:
            state.stats.storage_auth_headers += 1
        return state.signer.check(
            method,
            request.url.path,
            request.query_params.get("expires", ""),
            request.query_params.get("sig", ""),
        )

    async def upload(request: Request) -> Response:
        upload_id = request.path_params["upload_id"]
        problem = admit(request, "upload", "PUT")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > UPLOAD_MAX_BYTES:
            return _error(413, f"EntityTooLarge: uploads are limited to {UPLOAD_MAX_BYTES} bytes")
        if problem == "bad":
            await _drain(request)
            return _error(403, "SignatureDoesNotMatch: the request signature is invalid")
        if problem == "expired":
            state.faults.note_expired()
            await _drain(request)
            return _error(403, "AccessDenied: Request has expired")
        decision = state.faults.decide("upload")
        if decision.kind == "reset":
            return ResetResponse()
        if decision.kind != "ok":
            await _drain(request)
            return _error(decision.status, "injected fault", decision.headers)
        cut_at: int | None = None
        if declared is not None and declared.isdigit() and state.faults.cut_upload():
            cut_at = int(declared) // 2
        dest = state.upload_path(upload_id)
        tmp = dest.with_name(dest.name + f".part-{secrets.token_hex(4)}")
        total = 0
        state.uploads_started()
        try:
            with tmp.open("wb") as f:
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > UPLOAD_MAX_BYTES:
                        break
                    f.write(chunk)
                    state.stats.bytes_uploaded += len(chunk)
                    if cut_at is not None and total >= cut_at:
                        break
            if cut_at is not None:
                tmp.unlink(missing_ok=True)
                return ResetResponse()
            if total > UPLOAD_MAX_BYTES:
                tmp.unlink(missing_ok=True)
                return _error(
                    413, f"EntityTooLarge: uploads are limited to {UPLOAD_MAX_BYTES} bytes"
                )
            delay = state.faults.storage_latency()
            if delay > 0:
                await asyncio.sleep(delay)
            # Expiry is checked again once the body is in: a URL that expired
            # mid-transfer is refused as object storage would.
            problem = state.signer.check(
                "PUT",
                request.url.path,
                request.query_params.get("expires", ""),
                request.query_params.get("sig", ""),
            )
            if problem:
                tmp.unlink(missing_ok=True)
                state.faults.note_expired()
                return _error(403, "AccessDenied: Request has expired")
            os.replace(tmp, dest)
            state.upload_done(upload_id, total)
        except ClientDisconnect:
            # The client went away mid-body: nothing is stored, nobody to answer.
            tmp.unlink(missing_ok=True)
            state.stats.uploads_aborted += 1
            return Response(b"", status_code=400)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            state.uploads_finished()
        return Response(b"", status_code=200)

    async def download(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        problem = admit(request, "download", "GET")
        if problem == "bad":
            return _error(403, "SignatureDoesNotMatch: the request signature is invalid")
        if problem == "expired":
            return _error(403, "AccessDenied: Request has expired")
        decision = state.faults.decide("download")
        if decision.kind == "reset":
            return ResetResponse()
        if decision.kind != "ok":
            return _error(decision.status, "injected fault", decision.headers)
        path = state.output_path(run_id)
        if not path.exists():
            return _error(404, "NoSuchKey: the object does not exist")
        size = path.stat().st_size
        cut_at = size // 2 if size > 0 and state.faults.cut_download() else None

        def on_bytes(n: int) -> None:
            state.stats.bytes_downloaded += n

        return FileStreamResponse(path, on_bytes, cut_at)

    app = Starlette(
        routes=[
            Route("/uploads/{upload_id}", upload, methods=["PUT"]),
            Route("/outputs/{run_id}", download, methods=["GET"]),
        ]
    )
    return TransportMiddleware(app)
