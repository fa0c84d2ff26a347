"""The one retry policy of batchrun: which failures are retried, how long to wait, when to stop.

Every HTTP exchange (API calls, presigned uploads and downloads) goes through
`call_with_retry`, so the rules live here and nowhere else:

* A request that never left (connection refused, connect timeout, no pooled
  connection free) is always safe to send again, even a create-run.
* 429 means the service did not process the request: retried for every call.
* Read timeouts, cut connections and 500/502/503/504 are retried only for
  idempotent calls. For a non-idempotent call (create-run) they mean "it may
  or may not have happened": `AmbiguousError`, and the engine reconciles by
  listing runs before it sends again. 500 is in the retryable set because a
  500 on an idempotent GET/PUT/PATCH is, in practice, a transient fault; a
  deterministic 500 costs at most `max_attempts` tries.
* Waits are exponential with full jitter (AWS architecture blog, "Exponential
  backoff and jitter"). A `Retry-After` (seconds or HTTP-date) is a floor,
  capped at `retry_after_cap_s`, with a little jitter on top so that clients
  told the same instant do not come back in lockstep.
* A `RetryBudget` shared by a client bounds the total number of retries over
  its lifetime: a dead service is not hammered by every run in turn.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from batchrun.errors import AmbiguousError, ApiError

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses retried for idempotent calls. Only 429 is retried for non-idempotent ones."""

RETRY_AFTER_JITTER_FRACTION = 0.2
"""Jitter added on top of a Retry-After: U(0, base_s + this * retry_after)."""

_DEFAULT_RNG = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    """Every knob of the retry policy, named."""

    max_attempts: int = 8  # attempts per call, the first one included
    base_s: float = 0.5
    cap_s: float = 30.0
    retry_after_cap_s: float = 120.0  # a Retry-After longer than this is capped
    budget: int = 1000  # total retries allowed per client lifetime


class TransientError(Exception):
    """Raised by a send callable when an exchange failed after the request went out
    (e.g. a download body shorter than its Content-Length): retried like a read error."""


class RetryBudget:
    """A counter of retries shared by every call of one client; exhausted → stop retrying."""

    def __init__(self, total: int) -> None:
        self.total = max(0, total)
        self.spent = 0
        self._warned = False

    @property
    def remaining(self) -> int:
        return self.total - self.spent

    def try_spend(self) -> bool:
        if self.spent >= self.total:
            if not self._warned:
                self._warned = True
                log.warning(
                    "retry budget exhausted (%d retries spent): no more retries for this client",
                    self.spent,
                )
            return False
        self.spent += 1
        return True


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date).

    None when absent or unparseable; never negative (a date in the past is 0).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is garbage
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Full jitter: U(0, min(cap, base * 2**attempt)); attempt counts retries from 0."""
    exp = min(max(attempt, 0), 62)  # 2**62 is past any cap; avoids overflow
    ceiling = min(policy.cap_s, policy.base_s * (2.0**exp))
    return rng.uniform(0.0, max(0.0, ceiling))


def retry_delay(
    attempt: int, retry_after: float | None, policy: RetryPolicy, rng: random.Random
) -> float:
    """The wait before retry number `attempt` (0-based)."""
    if retry_after is None:
        return backoff_delay(attempt, policy, rng)
    floor = min(retry_after, policy.retry_after_cap_s)
    return floor + rng.uniform(0.0, policy.base_s + RETRY_AFTER_JITTER_FRACTION * floor)


_URL_QUERY = re.compile(r"(https?://[^\s?#'\"<>]*)[?#][^\s'\"<>]*")


# Loose signature-like parameters (e.g. echoed in a storage error body).
_SECRET_PARAM = re.compile(r"(?i)[\w-]*(?:sig|signature|token|credential)[\w-]*=[^&\s\"'<>]*")


def scrub(text: str) -> str:
    """Drop query strings and fragments from any URL in a text (signatures live there),
    and any stray `...signature=value` parameter."""
    return _SECRET_PARAM.sub("<redacted>", _URL_QUERY.sub(r"\1", text))


def describe_exception(exc: BaseException) -> str:
    detail = scrub(str(exc)).strip()
    name = type(exc).__name__
    return f"{name}: {detail}" if detail else name


# Errors raised before any byte of the request could reach the server.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Errors after the request may have reached the server.
_MAYBE_SENT = (
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    TransientError,
)


async def call_with_retry(
    send: Callable[[], Awaitable[httpx.Response]],
    *,
    policy: RetryPolicy,
    budget: RetryBudget | None,
    idempotent: bool,
    what: str,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    rng: random.Random | None = None,
    on_retry_after: Callable[[float], None] | None = None,
) -> httpx.Response:
    """Send with the retry policy; return the final response (possibly an error status).

    `what` names the call in logs and errors ("GET /v1/..."): it must hold no secret.
    `on_retry_after(seconds)` is told every 429's Retry-After (to penalize a rate limiter).

    Raises ApiError(status=None) when no response came; AmbiguousError when a
    non-idempotent request may have been processed (lost response or a 5xx).
    Any other exception raised by `send` propagates untouched.
    """
    rng = rng or _DEFAULT_RNG
    attempts = max(1, policy.max_attempts)
    attempt = 0
    while True:
        attempt += 1
        retry_after: float | None = None
        try:
            response = await send()
        except _NOT_SENT as exc:
            reason = describe_exception(exc)
        except _MAYBE_SENT as exc:
            reason = describe_exception(exc)
            if not idempotent:
                raise AmbiguousError(
                    f"{what}: no answer after the request was sent ({reason}); "
                    "it may or may not have been processed"
                ) from exc
        except httpx.TransportError as exc:
            # Unsupported protocol, proxy errors, ...: retrying cannot help.
            raise ApiError(f"{what}: {describe_exception(exc)}") from exc
        else:
            status = response.status_code
            if not idempotent and status >= 500:
                await response.aclose()
                raise AmbiguousError(
                    f"{what}: {status} {response.reason_phrase}; "
                    "it may or may not have been processed",
                    status=status,
                )
            if status not in RETRYABLE_STATUSES:
                return response
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status == 429 and on_retry_after is not None:
                on_retry_after(
                    min(retry_after, policy.retry_after_cap_s)
                    if retry_after is not None
                    else backoff_delay(attempt - 1, policy, rng)
                )
            if attempt >= attempts or (budget is not None and not budget.try_spend()):
                return response
            reason = f"{status} {response.reason_phrase}"
            await response.aclose()
            delay = retry_delay(attempt - 1, retry_after, policy, rng)
            log.warning("%s: %s; retry %d/%d in %.1fs", what, reason, attempt, attempts - 1, delay)
            await sleep(delay)
            continue

        # No response: retry if attempts and budget allow.
        if attempt >= attempts or (budget is not None and not budget.try_spend()):
            raise ApiError(f"{what}: no response after {attempt} attempt(s) ({reason})")
        delay = retry_delay(attempt - 1, None, policy, rng)
        log.warning("%s: %s; retry %d/%d in %.1fs", what, reason, attempt, attempts - 1, delay)
        await sleep(delay)
