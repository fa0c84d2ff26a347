"""The Nextmv runs API over httpx (async): one method per endpoint.

* One pooled `httpx.AsyncClient`, explicit timeouts, the retry policy of
  `batchrun.retry` for every call.
* The API key is attached per request, and only when the request goes to the
  API origin (scheme, host and port of `base_url`). Redirects are followed by
  this module, not by httpx, and only within that origin: a redirect anywhere
  else (another host or port, https → http) is refused with an ApiError, so
  the key can never reach another server.
* Pacing: create-run takes a slot of the runs-per-second limiter, run results
  and metadata of the results-per-10-s limiter, every request of the overall
  requests-per-minute limiter; a 429 penalizes the limiter of its kind by its
  Retry-After.
* Create-run is never resent once it may have reached the service: a lost
  answer or a 5xx raises AmbiguousError and the engine reconciles with
  `find_runs_by_marker` before it sends again.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import quote, urlencode

import httpx

from batchrun.errors import AmbiguousError, ApiError, AuthError
from batchrun.httppool import HttpPool
from batchrun.model import Limits
from batchrun.pacing import RateLimiter
from batchrun.retry import RetryBudget, RetryPolicy, call_with_retry, parse_retry_after, scrub
from batchrun.transfer import redact_url

log = logging.getLogger(__name__)

RunStatus = Literal["queued", "running", "succeeded", "failed", "canceled", "none"]
RUN_STATUSES: frozenset[str] = frozenset(
    {"queued", "running", "succeeded", "failed", "canceled", "none"}
)

DEFAULT_API_TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=60.0)
API_REQUESTS_PER_MINUTE = 2000.0  # documented overall API limit
MAX_REDIRECTS = 5
SERVICE_MESSAGE_MAX_CHARS = 500
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, repr=False)
class UploadTicket:
    upload_id: str
    upload_url: str  # a credential: never shown whole

    def __repr__(self) -> str:
        shown = redact_url(self.upload_url)
        return f"UploadTicket(upload_id={self.upload_id!r}, upload_url={shown!r})"

    __str__ = __repr__


@dataclass(frozen=True)
class RunState:
    run_id: str
    status: RunStatus
    error: str | None  # metadata.error / error_log.error for failed runs
    output_url: str | None = field(repr=False)  # presigned download URL: never log
    output_size: int | None
    name: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class ListedRun:
    run_id: str
    name: str | None
    description: str | None
    status: str


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    scheme = url.scheme.lower()
    return scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(scheme)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _service_message(response: httpx.Response) -> str:
    """The service's own explanation from an error body, short and scrubbed of URLs."""
    text = response.text
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail", "description"):
            value = data.get(key)
            if isinstance(value, str) and value.strip():
                text = value
                break
    text = scrub(" ".join(text.split()))
    if len(text) > SERVICE_MESSAGE_MAX_CHARS:
        text = text[:SERVICE_MESSAGE_MAX_CHARS] + "…"
    return text or "no detail"


def _status(value: object) -> RunStatus:
    if isinstance(value, str) and value in RUN_STATUSES:
        return cast(RunStatus, value)
    return "none"


def _parse_run_state(run_id: str, data: Mapping[str, Any]) -> RunState:
    meta = data.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    error = _str_or_none(meta.get("error"))
    error_log = data.get("error_log")
    if not error and isinstance(error_log, dict):
        error = _str_or_none(error_log.get("error"))
    output = data.get("output")
    output_url = _str_or_none(output.get("url")) if isinstance(output, dict) else None
    size = meta.get("output_size")
    return RunState(
        run_id=_str_or_none(data.get("id")) or run_id,
        status=_status(meta.get("status_v2")),
        error=error or None,
        output_url=output_url,
        output_size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        name=_str_or_none(data.get("name")),
        description=_str_or_none(data.get("description")),
    )


def _parse_listed(item: object) -> ListedRun | None:
    if not isinstance(item, dict):
        return None
    run_id = _str_or_none(item.get("id"))
    if not run_id:
        return None
    meta = item.get("metadata")
    status = meta.get("status_v2") if isinstance(meta, dict) else item.get("status_v2")
    return ListedRun(
        run_id=run_id,
        name=_str_or_none(item.get("name")),
        description=_str_or_none(item.get("description")),
        status=status if isinstance(status, str) else "none",
    )


class ApiClient:
    """The runs API. Errors: AuthError (401/403), AmbiguousError, ApiError (the rest)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        limits: Limits,
        policy: RetryPolicy = RetryPolicy(),  # noqa: B008 (frozen: safe as a default)
        timeout: httpx.Timeout = DEFAULT_API_TIMEOUT,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
        requests_per_minute: float = API_REQUESTS_PER_MINUTE,
    ) -> None:
        self._base = httpx.URL(base_url.rstrip("/"))
        if self._base.scheme not in _DEFAULT_PORTS or not self._base.host:
            raise ValueError(f"API base URL must be http(s)://host[:port]: {redact_url(base_url)}")
        self._origin = _origin(self._base)
        self._prefix = str(self._base.copy_with(query=None, fragment=None)).rstrip("/")
        self._auth = f"Bearer {api_key}" if api_key else None
        self.policy = policy
        self.budget = RetryBudget(policy.budget)
        self._http = HttpPool(timeout=timeout, max_connections=max_connections, transport=transport)
        self.runs_limiter = RateLimiter(limits.runs_per_second, 1.0)
        self.results_limiter = RateLimiter(limits.results_per_10s, 10.0)
        self.requests_limiter = RateLimiter(requests_per_minute, 60.0)
        self._stats: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"ApiClient({redact_url(str(self._base))})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def stats(self) -> dict[str, int]:
        """Requests sent (total and per kind), retries, 429s received, ms spent pacing."""
        out = dict(self._stats)
        out["retries"] = self.budget.spent
        out["pacing_wait_ms"] = int(
            1000
            * (
                self.runs_limiter.waited_s
                + self.results_limiter.waited_s
                + self.requests_limiter.waited_s
            )
        )
        out.setdefault("requests", 0)
        out.setdefault("responses_429", 0)
        return out

    # -- plumbing -------------------------------------------------------------

    def _same_origin(self, url: httpx.URL) -> bool:
        return _origin(url) == self._origin

    def _url(self, path: str, params: Mapping[str, str] | None = None) -> httpx.URL:
        # One parse per request: httpx's copy_with/copy_merge_params parse again each.
        text = self._prefix + path
        if params:
            text += "?" + urlencode(params, quote_via=quote)
        return httpx.URL(text)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        idempotent: bool,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        limiter: RateLimiter | None = None,
    ) -> httpx.Response:
        start = self._url(path, params)
        what = f"{method} {start.path}"
        refused: list[httpx.URL] = []

        async def send() -> httpx.Response:
            url = start
            hops = 0
            while True:
                if limiter is not None:
                    await limiter.acquire()
                await self.requests_limiter.acquire()
                headers = {"Accept": "application/json"}
                if content is not None:
                    headers["Content-Type"] = "application/json"
                if self._auth is not None and self._same_origin(url):
                    headers["Authorization"] = self._auth
                request = self._http.request(method, url, content=content, headers=headers)
                self._stats["requests"] += 1
                self._stats[f"requests_{kind}"] += 1
                response = await self._http.send(request)
                if response.status_code == 429:
                    self._stats["responses_429"] += 1
                if not idempotent and response.status_code >= 500 and limiter is not None:
                    # Not retried here (the engine reconciles first), so a Retry-After
                    # would be lost: it holds back this kind's next request instead.
                    wait = parse_retry_after(response.headers.get("retry-after"))
                    if wait is not None:
                        limiter.penalize(min(wait, self.policy.retry_after_cap_s))
                if not response.is_redirect:
                    return response
                target = url.join(response.headers["location"])
                keeps_method = response.status_code in (307, 308) or method in ("GET", "HEAD")
                if not self._same_origin(target) or not keeps_method or hops >= MAX_REDIRECTS:
                    refused[:] = [target]
                    return response
                hops += 1
                url = target

        response = await call_with_retry(
            send,
            policy=self.policy,
            budget=self.budget,
            idempotent=idempotent,
            what=what,
            on_retry_after=(limiter or self.requests_limiter).penalize,
        )
        status = response.status_code
        if response.is_redirect:
            target = redact_url(str(refused[0])) if refused else "?"
            raise ApiError(
                f"{what}: {status} redirect to {target} not followed: only redirects within "
                f"{redact_url(str(self._base))} are (the API key goes nowhere else)",
                status=status,
            )
        if status in (401, 403):
            raise AuthError(
                f"{what}: {status} {response.reason_phrase}: {_service_message(response)} "
                "(check the API key)",
                status=status,
            )
        if status >= 400:
            raise ApiError(
                f"{what}: {status} {response.reason_phrase}: {_service_message(response)}",
                status=status,
            )
        return response

    @staticmethod
    def _json(response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(
                f"{what}: the service answered {response.status_code} with invalid JSON",
                status=response.status_code,
            ) from exc

    @staticmethod
    def _runs_path(app: str, *rest: str) -> str:
        parts = [quote(app, safe=""), "runs", *(quote(p, safe="") for p in rest)]
        return "/v1/applications/" + "/".join(parts)

    # -- endpoints ------------------------------------------------------------

    async def upload_url(self, app: str) -> UploadTicket:
        """POST /runs/uploadurl. Retried like an idempotent call: an unused URL costs nothing."""
        path = self._runs_path(app, "uploadurl")
        response = await self._request("POST", path, kind="upload_url", idempotent=True)
        data = self._json(response, f"POST {path}")
        upload_id = data.get("upload_id") if isinstance(data, dict) else None
        upload_url = data.get("upload_url") if isinstance(data, dict) else None
        if not isinstance(upload_id, str) or not isinstance(upload_url, str):
            raise ApiError(f"POST {path}: answer lacks upload_id/upload_url", status=200)
        return UploadTicket(upload_id=upload_id, upload_url=upload_url)

    async def create_run(
        self,
        app: str,
        instance: str,
        *,
        name: str,
        description: str,
        options: Mapping[str, str],
        input_json: bytes | None = None,
        upload_id: str | None = None,
        configuration: Mapping[str, Any] | None = None,
    ) -> str:
        """POST /runs?instance_id=...; returns the run id.

        `input_json` is compact JSON, spliced into the body as is. Never resent once
        it may have reached the service (AmbiguousError: reconcile by listing).
        """
        if (input_json is None) == (upload_id is None):
            raise ValueError("create_run needs exactly one of input_json and upload_id")
        bad = [k for k, v in options.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"run options must map strings to strings: {bad}")
        fields: dict[str, Any] = {"name": name, "description": description}
        fields["options"] = dict(options)
        if upload_id is not None:
            fields["upload_id"] = upload_id
        if configuration is not None:
            fields["configuration"] = dict(configuration)
        rest = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
        if input_json is not None:
            body = b'{"input":' + input_json.strip() + b"," + rest[1:]
        else:
            body = rest
        path = self._runs_path(app)
        response = await self._request(
            "POST",
            path,
            kind="create_run",
            idempotent=False,
            params={"instance_id": instance},
            content=body,
            limiter=self.runs_limiter,
        )
        try:
            data = response.json()
        except ValueError:
            data = None
        run_id = data.get("run_id") if isinstance(data, dict) else None
        if not isinstance(run_id, str) or not run_id:
            # Probably created, but we cannot tell which run: the engine must reconcile.
            raise AmbiguousError(
                f"POST {path}: {response.status_code} answer without a run_id; "
                "the run may have been created",
                status=response.status_code,
            )
        return run_id

    async def run_state(self, app: str, run_id: str) -> RunState:
        """GET /runs/{id}?format=url: status, error and (when succeeded) the output URL."""
        path = self._runs_path(app, run_id)
        response = await self._request(
            "GET",
            path,
            kind="run_state",
            idempotent=True,
            params={"format": "url"},
            limiter=self.results_limiter,
        )
        data = self._json(response, f"GET {path}")
        if not isinstance(data, dict):
            raise ApiError(f"GET {path}: answer is not an object", status=response.status_code)
        return _parse_run_state(run_id, data)

    async def list_runs(
        self, app: str, *, page_token: str | None = None
    ) -> tuple[list[ListedRun], str | None]:
        """One page of GET /runs?pagereturn=true; returns (runs, next page token or None)."""
        path = self._runs_path(app)
        params = {"pagereturn": "true"}
        if page_token:
            params["pagetoken"] = page_token
        response = await self._request(
            "GET", path, kind="list_runs", idempotent=True, params=params
        )
        data = self._json(response, f"GET {path}")
        if isinstance(data, list):  # a service that ignores pagereturn
            items: object = data
            token: object = None
        elif isinstance(data, dict):
            items = data.get("runs") or []
            token = data.get("next_page_token")
        else:
            raise ApiError(f"GET {path}: answer is not a list of runs", status=200)
        if not isinstance(items, list):
            raise ApiError(f"GET {path}: 'runs' is not a list", status=200)
        runs = [r for r in map(_parse_listed, items) if r is not None]
        return runs, token if isinstance(token, str) and token else None

    async def find_runs_by_marker(
        self, app: str, markers: Collection[str], *, max_pages: int = 200
    ) -> dict[str, ListedRun]:
        """Page through the runs until each marker is found in a run's description or name.

        Markers are matched as substrings: make them unambiguous (fixed length, unique).
        When several runs carry one marker, the first listed wins (a warning is logged).
        """
        wanted = {m for m in markers if m}
        found: dict[str, ListedRun] = {}
        token: str | None = None
        seen_tokens: set[str] = set()
        for _ in range(max_pages):
            if not wanted - found.keys():
                break
            runs, token = await self.list_runs(app, page_token=token)
            for run in runs:
                text = f"{run.description or ''}\n{run.name or ''}"
                for marker in wanted:
                    if marker not in text:
                        continue
                    if marker in found:
                        if found[marker].run_id != run.run_id:
                            log.warning(
                                "runs %s and %s both carry marker %s",
                                found[marker].run_id,
                                run.run_id,
                                marker,
                            )
                    else:
                        found[marker] = run
            if token is None or token in seen_tokens:
                break
            seen_tokens.add(token)
        return found

    async def cancel_run(self, app: str, run_id: str) -> None:
        """PATCH /runs/{id}/cancel (harmless to repeat: retried)."""
        path = self._runs_path(app, run_id, "cancel")
        await self._request("PATCH", path, kind="cancel_run", idempotent=True)
