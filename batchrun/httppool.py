"""The HTTP session batchrun's API and storage clients share.

`HttpPool` builds httpx `Request`s and sends them straight to a transport
(batchrun's own HTTP/1.1 transport for direct connections, httpx's for
proxied ones), with the timeouts, default headers and debug logging of
batchrun. See `http11` for why the transport is batchrun's own.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import urllib.request
from collections.abc import AsyncIterable, Mapping

import httpx

from batchrun import __version__
from batchrun.http11 import Http11Transport

log = logging.getLogger(__name__)

USER_AGENT = f"batchrun/{__version__}"


class HttpPool:
    """Sends httpx Requests straight to pooled transports, one per proxy route.

    `httpx.AsyncClient.send` adds, per request, a cookie jar update, an auth
    flow, redirect bookkeeping and a second URL merge; batchrun uses none of
    them (the API client sets its own Authorization and follows redirects
    itself, within one origin). Direct connections go through batchrun's
    `http11.Http11Transport`; an origin the environment sends through a proxy
    (HTTP(S)_PROXY, ALL_PROXY, NO_PROXY, as urllib reads them) goes through
    httpx's own transport, which speaks to proxies. Loopback hosts never go
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
        self._max_connections = max_connections
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
                if proxy is None:
                    transport = Http11Transport(max_connections=self._max_connections)
                else:
                    _quiet_sniffio()
                    # Idle connections kept up to max_connections (httpx keeps 20).
                    limits = httpx.Limits(
                        max_connections=self._max_connections,
                        max_keepalive_connections=self._max_connections,
                    )
                    transport = httpx.AsyncHTTPTransport(limits=limits, proxy=proxy)
                self._by_proxy[proxy] = transport
            self._routes[key] = transport
        return transport


def _quiet_sniffio() -> None:
    """httpcore (httpx's transport, used for proxied origins) runs `import sniffio`
    for every lock and event of every request. Where sniffio is not installed
    (recent anyio does not need it) each import failed anew, a search of
    sys.path: ~13% of apply's CPU. A None entry makes the miss instant; httpcore
    then takes asyncio, which is what batchrun runs on."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


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
