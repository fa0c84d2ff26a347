"""The HTTP client batchrun's API and storage clients share: httpx, with a leaner pool.

httpcore's connection pool re-examines every connection each time a request
starts or a response closes: it probes each idle keep-alive connection's
socket for a server disconnect (`has_expired()`: a `poll` and a `getpeername`
syscall each) and counts idle connections once per idle connection (quadratic
in the pool size). At concurrency 64 that was ~35% of `apply`'s CPU in the
orchestration benchmark (docs/performance.md), 2 × 64 probes per request.

`LeanConnectionPool` assigns requests the same way (first available
connection of the origin, else a new one, else replace an idle one) but:

* probes only the connection it is about to reuse, once, and sweeps the other
  idle connections for expiry at most once per `SWEEP_INTERVAL_S`;
* counts a connection busy from its assignment on: httpcore could hand an idle
  connection whose request had not started yet to a second request, which
  then failed with ConnectionNotAvailable and went round again;
* bounds idle connections by `max_keepalive_connections` (httpcore compared
  the pool's total size with it, closing idle connections whenever more than
  that many were open at all).

It overrides one private method of httpcore 1.x; `install_lean_pool` installs it
only where the pool is exactly httpcore's (a proxy pool is left alone), and
`tests/test_httppool.py` fails if an httpx/httpcore upgrade stops it from
being installed.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import AsyncIterable, Mapping
from typing import TYPE_CHECKING

import httpcore
import httpx

from batchrun import __version__
from batchrun.netbackend import AsyncioBackend

if TYPE_CHECKING:
    from httpcore._async.interfaces import AsyncConnectionInterface

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0
USER_AGENT = f"batchrun/{__version__}"


class LeanConnectionPool(httpcore.AsyncConnectionPool):
    _next_sweep = 0.0

    def _assign_requests_to_connections(self) -> list[AsyncConnectionInterface]:
        closing: list[AsyncConnectionInterface] = []
        now = time.monotonic()
        sweep = now >= self._next_sweep
        if sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
        # A connection is busy from the moment it is assigned until its request
        # leaves the pool (response closed), even before the request starts.
        busy = {id(r.connection) for r in self._requests if r.connection is not None}
        live: list[AsyncConnectionInterface] = []
        for connection in self._connections:
            if connection.is_closed():
                continue
            if sweep and id(connection) not in busy and connection.has_expired():
                closing.append(connection)
                continue
            live.append(connection)
        self._connections = live

        for pool_request in self._requests:
            if not pool_request.is_queued():
                continue
            origin = pool_request.request.url.origin
            chosen: AsyncConnectionInterface | None = None
            for connection in list(self._connections):
                if id(connection) in busy or not connection.can_handle_request(origin):
                    continue
                if not connection.is_available():
                    continue
                # The one liveness probe: an idle socket that is readable means
                # the server closed it (or is about to); don't send on it.
                if connection.has_expired():
                    self._connections.remove(connection)
                    closing.append(connection)
                    continue
                chosen = connection
                break
            if chosen is None:
                if len(self._connections) >= self._max_connections:
                    idle = next(
                        (c for c in self._connections if id(c) not in busy and c.is_idle()),
                        None,
                    )
                    if idle is None:
                        continue  # stays queued until a response closes
                    self._connections.remove(idle)
                    closing.append(idle)
                chosen = self.create_connection(origin)
                self._connections.append(chosen)
            busy.add(id(chosen))
            pool_request.assign_to_connection(chosen)

        if len(self._connections) > self._max_keepalive_connections:
            spare = [c for c in self._connections if id(c) not in busy and c.is_idle()]
            for connection in spare[: max(0, len(spare) - self._max_keepalive_connections)]:
                self._connections.remove(connection)
                closing.append(connection)
        return closing


class HttpPool:
    """Sends httpx Requests straight to pooled transports, one per proxy route.

    `httpx.AsyncClient.send` adds, per request, a cookie jar update, an auth
    flow, redirect bookkeeping and a second URL merge; batchrun uses none of
    them (the API client sets its own Authorization and follows redirects
    itself, within one origin) and together they cost ~15% of apply's CPU.
    What it keeps from httpx: `Request`/`Response`, the transports (TLS,
    SSL_CERT_FILE/SSL_CERT_DIR, exception mapping) and the environment's
    proxies (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY). Loopback hosts never go
    through a proxy: it could not reach them.
    """

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._timeout = timeout.as_dict()
        # Idle connections are kept up to max_connections: a batch at
        # concurrency N reuses N connections (httpx's default keeps 20).
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._fixed = transport
        self._by_proxy: dict[str | None, httpx.AsyncBaseTransport] = {}
        self._routes: dict[tuple[str, str], httpx.AsyncBaseTransport] = {}  # (scheme, host)
        self._headers = {
            "User-Agent": user_agent,
            "Accept-Encoding": "gzip, deflate",
            "Connection": "keep-alive",
        }

    def request(
        self,
        method: str,
        url: httpx.URL | str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
    ) -> httpx.Request:
        merged = dict(self._headers)
        if headers:
            merged.update(headers)
        return httpx.Request(
            method, url, headers=merged, content=content, extensions={"timeout": self._timeout}
        )

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """The response; its body read and the connection released unless `stream`."""
        response = await self._transport_for(request.url).handle_async_request(request)
        response.request = request
        if log.isEnabledFor(logging.DEBUG):
            url = request.url  # without its query: a presigned URL's signature lives there
            log.debug(
                "HTTP Request: %s %s://%s%s %d",
                request.method,
                url.scheme,
                url.netloc.decode("ascii", "replace"),
                url.path,
                response.status_code,
            )
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def aclose(self) -> None:
        transports = list(self._by_proxy.values())
        if self._fixed is not None:
            transports.append(self._fixed)
        self._by_proxy.clear()
        self._routes.clear()
        for transport in transports:
            await transport.aclose()

    def _transport_for(self, url: httpx.URL) -> httpx.AsyncBaseTransport:
        if self._fixed is not None:
            return self._fixed
        key = (url.scheme, url.host)
        transport = self._routes.get(key)
        if transport is None:
            proxy = _proxy_for(url)
            transport = self._by_proxy.get(proxy)
            if transport is None:
                transport = httpx.AsyncHTTPTransport(limits=self._limits, proxy=proxy)
                install_lean_pool(transport)  # leaves a proxy's pool as it is
                self._by_proxy[proxy] = transport
            self._routes[key] = transport
        return transport


def _proxy_for(url: httpx.URL) -> str | None:
    """The environment's proxy for this URL (urllib's reading of *_PROXY/NO_PROXY), or None."""
    host = url.host
    if host in ("localhost", "::1") or host.startswith("127."):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy


def install_lean_pool(transport: httpx.AsyncBaseTransport) -> bool:
    """Make an httpx transport's direct pool a LeanConnectionPool; True if it is one."""
    pool = getattr(transport, "_pool", None)
    if isinstance(pool, LeanConnectionPool):
        return True
    if type(pool) is not httpcore.AsyncConnectionPool:
        return False  # a proxy pool, or an httpcore that changed: keep its own
    # Same state, same constructor arguments (TLS, limits): only the assignment
    # method differs, so the class can be swapped in place. New connections
    # then take batchrun's asyncio backend instead of anyio's.
    pool.__class__ = LeanConnectionPool
    pool._network_backend = AsyncioBackend()
    return True
