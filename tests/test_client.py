"""batchrun.client: one edge at a time with httpx.MockTransport; real loopback sockets
where they matter (redirects across origins, a server that accepts and hangs)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import httpx
import pytest

from batchrun.client import ApiClient, RunState, UploadTicket
from batchrun.errors import AmbiguousError, ApiError, AuthError
from batchrun.model import Limits
from batchrun.retry import RetryPolicy

T = TypeVar("T")
KEY = "SECRET-KEY-0123456789"
BASE = "https://api.test"
NO_LIMITS = Limits(runs_per_second=float("inf"), results_per_10s=float("inf"))
FAST = RetryPolicy(max_attempts=3, base_s=0.001, cap_s=0.01, retry_after_cap_s=0.05)
Handler = Callable[[httpx.Request], httpx.Response]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Recorder:
    """A MockTransport handler that plays a script of responses and keeps every request."""

    def __init__(self, *script: httpx.Response | Exception | Handler) -> None:
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if isinstance(step, Exception):
            raise step
        if callable(step) and not isinstance(step, httpx.Response):
            return step(request)
        return step


def client_for(rec: Recorder, limits: Limits = NO_LIMITS, base: str = BASE) -> ApiClient:
    return ApiClient(base, KEY, limits=limits, policy=FAST, transport=httpx.MockTransport(rec))


def call(rec: Recorder, fn: Callable[[ApiClient], Coroutine[Any, Any, T]], **kw: Any) -> T:
    async def main() -> T:
        client = client_for(rec, **kw)
        try:
            return await fn(client)
        finally:
            await client.aclose()

    return run(main())


def create(client: ApiClient) -> Coroutine[Any, Any, str]:
    return client.create_run(
        "knapsack",
        "latest",
        name="n1",
        description="batchrun:k-abc",
        options={"duration": "2"},
        input_json=b'{"items":[1,2]}',
    )


def no_secret(text: str) -> None:
    assert KEY not in text and "sig=" not in text


# -- requests as sent -----------------------------------------------------------


def test_create_run_body_and_headers() -> None:
    rec = Recorder(httpx.Response(200, json={"run_id": "latest-Ab1"}))
    assert call(rec, create) == "latest-Ab1"
    (req,) = rec.requests
    assert req.method == "POST" and req.url.path == "/v1/applications/knapsack/runs"
    assert req.url.params["instance_id"] == "latest"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-type"] == "application/json"
    assert req.content.startswith(b'{"input":{"items":[1,2]},')
    body = json.loads(req.content)
    assert body == {
        "input": {"items": [1, 2]},
        "name": "n1",
        "description": "batchrun:k-abc",
        "options": {"duration": "2"},
    }


def test_create_run_with_upload_id_and_argument_checks() -> None:
    rec = Recorder(httpx.Response(200, json={"run_id": "r"}))

    async def fn(c: ApiClient) -> str:
        with pytest.raises(ValueError):
            await c.create_run("a", "i", name="n", description="d", options={})
        return await c.create_run("a", "i", name="n", description="d", options={}, upload_id="u1")

    assert call(rec, fn) == "r"
    assert json.loads(rec.requests[0].content)["upload_id"] == "u1"


# -- errors: what is retried, what is not ---------------------------------------


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_client_errors_not_retried_with_service_message(status: int) -> None:
    rec = Recorder(httpx.Response(status, json={"error": "options.duration: must be a number"}))
    with pytest.raises(ApiError) as info:
        call(rec, create)
    assert len(rec.requests) == 1 and info.value.status == status
    msg = str(info.value)
    assert msg.startswith(f"POST /v1/applications/knapsack/runs: {status} ")
    assert msg.endswith("options.duration: must be a number")
    no_secret(msg)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_not_retried(status: int) -> None:
    rec = Recorder(httpx.Response(status, text="invalid token"))
    with pytest.raises(AuthError) as info:
        call(rec, lambda c: c.run_state("app", "r1"))
    assert len(rec.requests) == 1 and info.value.status == status
    no_secret(str(info.value))


def test_create_run_retried_on_429_and_connect_error_and_paced() -> None:
    rec = Recorder(
        httpx.Response(429, headers={"Retry-After": "0.03"}),
        httpx.ConnectError("refused"),
        httpx.Response(200, json={"run_id": "r9"}),
    )

    async def fn(c: ApiClient) -> dict[str, int]:
        assert await create(c) == "r9"
        return c.stats()

    stats = call(rec, fn, limits=Limits(runs_per_second=1000.0))
    assert len(rec.requests) == 3
    assert stats["responses_429"] == 1 and stats["retries"] == 2
    assert stats["requests_create_run"] == 3


@pytest.mark.parametrize(
    "failure", [httpx.ReadTimeout("t"), httpx.RemoteProtocolError("gone"), httpx.Response(502)]
)
def test_create_run_lost_answer_is_ambiguous(failure: httpx.Response | Exception) -> None:
    rec = Recorder(failure, httpx.Response(200, json={"run_id": "dup"}))
    with pytest.raises(AmbiguousError) as info:
        call(rec, create)
    assert len(rec.requests) == 1  # never sent twice
    no_secret(str(info.value))


def test_create_run_answer_without_run_id_is_ambiguous() -> None:
    rec = Recorder(httpx.Response(200, text="oops"))
    with pytest.raises(AmbiguousError):
        call(rec, create)


def test_get_retried_on_503_and_read_timeout() -> None:
    ok = {"id": "r1", "metadata": {"status_v2": "running"}}
    rec = Recorder(
        httpx.Response(503, headers={"Retry-After": "0"}),
        httpx.ReadTimeout("t"),
        httpx.Response(200, json=ok),
    )
    state = call(rec, lambda c: c.run_state("app", "r1"))
    assert state.status == "running" and len(rec.requests) == 3
    assert rec.requests[0].url.params["format"] == "url"


def test_run_state_parsing_and_repr_hide_the_url() -> None:
    url = "https://storage.test/out/r1?X-Amz-Signature=abc&sig=def"
    ok = {
        "id": "r1",
        "name": "n",
        "description": "d",
        "metadata": {"status_v2": "succeeded", "output_size": 123},
        "output": {"url": url},
    }
    failed = {
        "id": "r2",
        "metadata": {"status_v2": "failed", "error": ""},
        "error_log": {"error": "boom", "stderr": "..."},
    }
    rec = Recorder(httpx.Response(200, json=ok), httpx.Response(200, json=failed))

    async def fn(c: ApiClient) -> tuple[RunState, RunState]:
        return await c.run_state("app", "r1"), await c.run_state("app", "r2")

    s1, s2 = call(rec, fn)
    assert (s1.status, s1.output_url, s1.output_size) == ("succeeded", url, 123)
    assert (s2.status, s2.error, s2.output_url) == ("failed", "boom", None)
    for text in (repr(s1), str(s1)):
        assert "Signature" not in text and "sig=" not in text


def test_upload_ticket_hides_its_url() -> None:
    url = "https://storage.test:9000/up/u1?sig=abc&X-Amz-Signature=x"
    rec = Recorder(httpx.Response(200, json={"upload_id": "u1", "upload_url": url}))
    ticket: UploadTicket = call(rec, lambda c: c.upload_url("app"))
    assert ticket.upload_url == url and ticket.upload_id == "u1"
    for text in (repr(ticket), str(ticket), f"{ticket}", repr([ticket])):
        assert "sig=" not in text and "Signature" not in text
        assert "https://storage.test:9000/up/u1" in text


def test_list_runs_pages_and_find_by_marker() -> None:
    def page(request: httpx.Request) -> httpx.Response:
        assert request.url.params["pagereturn"] == "true"
        token = request.url.params.get("pagetoken")
        if token is None:
            runs = [{"id": "a", "description": "batchrun:k1", "metadata": {"status_v2": "queued"}}]
            return httpx.Response(200, json={"runs": runs, "next_page_token": "p2"})
        assert token == "p2"
        runs = [
            {"id": "b", "description": "other", "metadata": {"status_v2": "running"}},
            {"id": "c", "description": "x batchrun:k2 y", "metadata": {"status_v2": "failed"}},
        ]
        return httpx.Response(200, json={"runs": runs})

    rec = Recorder(page)
    found = call(
        rec, lambda c: c.find_runs_by_marker("app", ["batchrun:k1", "batchrun:k2", "nope"])
    )
    assert {k: v.run_id for k, v in found.items()} == {"batchrun:k1": "a", "batchrun:k2": "c"}
    assert found["batchrun:k2"].status == "failed"
    assert len(rec.requests) == 2

    rec2 = Recorder(page)
    found2 = call(rec2, lambda c: c.find_runs_by_marker("app", ["batchrun:k1"]))
    assert list(found2) == ["batchrun:k1"] and len(rec2.requests) == 1  # stops early


def test_cancel_run() -> None:
    rec = Recorder(httpx.Response(200, json={}))
    call(rec, lambda c: c.cancel_run("app", "r/1"))
    assert rec.requests[0].method == "PATCH"
    assert rec.requests[0].url.raw_path == b"/v1/applications/app/runs/r%2F1/cancel"


# -- the API key goes to the API origin only ------------------------------------


def test_same_origin_redirect_followed_with_key() -> None:
    rec = Recorder(
        httpx.Response(307, headers={"Location": "/v1/applications/app/runs/r1?format=url"}),
        httpx.Response(200, json={"id": "r1", "metadata": {"status_v2": "queued"}}),
    )
    call(rec, lambda c: c.run_state("app", "r1"))
    assert [r.headers.get("authorization") for r in rec.requests] == [f"Bearer {KEY}"] * 2


@pytest.mark.parametrize(
    "location",
    [
        "http://api.test/v1/applications/app/runs/r1",  # https -> http
        "https://api.test:8443/v1/applications/app/runs/r1",  # another port
        "https://evil.test/v1/x?sig=1",  # another host
    ],
)
def test_cross_origin_redirect_refused(location: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if (
            request.url.host == "api.test"
            and request.url.scheme == "https"
            and request.url.port is None
        ):
            return httpx.Response(302, headers={"Location": location})
        return httpx.Response(200, json={"id": "r1", "metadata": {"status_v2": "queued"}})

    rec = Recorder(handler)
    with pytest.raises(ApiError) as info:
        call(rec, lambda c: c.run_state("app", "r1"))
    assert len(rec.requests) == 1  # nothing sent to the target at all
    no_secret(str(info.value))
    assert "not followed" in str(info.value)


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.seen: list[dict[str, str]] = []
        self.httpd.seen = self.seen  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self) -> None:
        self.server.seen.append({k.lower(): v for k, v in self.headers.items()})  # type: ignore[attr-defined]


@pytest.fixture
def servers() -> Iterator[tuple[_Server, _Server]]:
    class Target(_Quiet):
        def do_GET(self) -> None:
            self._record()
            body = b'{"id":"r1","metadata":{"status_v2":"queued"}}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    target = _Server(Target)

    class Api(_Quiet):
        def do_GET(self) -> None:
            self._record()
            self.send_response(302)
            self.send_header("Location", target.url + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

    api = _Server(Api)
    try:
        yield api, target
    finally:
        api.close()
        target.close()


def test_loopback_redirect_to_other_port_carries_no_key(servers: tuple[_Server, _Server]) -> None:
    api, target = servers

    async def main() -> None:
        async with ApiClient(api.url, KEY, limits=NO_LIMITS, policy=FAST) as client:
            with pytest.raises(ApiError) as info:
                await client.run_state("app", "r1")
            no_secret(str(info.value))

    run(main())
    assert api.seen and api.seen[0]["authorization"] == f"Bearer {KEY}"
    assert all("authorization" not in h for h in target.seen)


def test_hanging_server_times_out_and_is_retried() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)  # accepts (kernel backlog) and never answers
    port = sock.getsockname()[1]
    try:

        async def main() -> None:
            timeout = httpx.Timeout(connect=1.0, read=0.2, write=1.0, pool=1.0)
            async with ApiClient(
                f"http://127.0.0.1:{port}", KEY, limits=NO_LIMITS, policy=FAST, timeout=timeout
            ) as client:
                with pytest.raises(ApiError) as info:
                    await client.run_state("app", "r1")
                assert info.value.status is None
                assert client.stats()["requests"] == FAST.max_attempts
                with pytest.raises(AmbiguousError):
                    await create(client)

        t0 = time.monotonic()
        run(main())
        assert time.monotonic() - t0 < 5.0
    finally:
        sock.close()


def test_pacing_spaces_create_runs() -> None:
    times: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        return httpx.Response(200, json={"run_id": "r"})

    async def fn(c: ApiClient) -> None:
        await asyncio.gather(*(create(c) for _ in range(5)))

    call(Recorder(handler), fn, limits=Limits(runs_per_second=50.0))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 5 and min(gaps) >= 1 / 50
