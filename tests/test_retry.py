"""The retry policy (batchrun.retry) and the rate limiter (batchrun.pacing), with fakes only."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import httpx
import pytest

from batchrun.errors import AmbiguousError, ApiError
from batchrun.pacing import RateLimiter
from batchrun.retry import (
    RetryBudget,
    RetryPolicy,
    backoff_delay,
    call_with_retry,
    parse_retry_after,
)

T = TypeVar("T")
FAST = RetryPolicy(max_attempts=4, base_s=0.5, cap_s=30.0, retry_after_cap_s=120.0)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


Outcome = httpx.Response | Exception


def scripted(*outcomes: Outcome) -> tuple[Callable[[], Awaitable[httpx.Response]], list[int]]:
    """A send() that plays outcomes in order (the last one repeats); counts calls."""
    calls = [0]

    async def send() -> httpx.Response:
        outcome = outcomes[min(calls[0], len(outcomes) - 1)]
        calls[0] += 1
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return send, calls


def resp(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, content=b"")


# -- Retry-After ----------------------------------------------------------------


def test_parse_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 12 ") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_is_a_floor(status: int) -> None:
    send, calls = scripted(resp(status, **{"Retry-After": "7"}), resp(200))
    sleep = FakeSleep()
    out = run(
        call_with_retry(send, policy=FAST, budget=None, idempotent=True, what="GET /x", sleep=sleep)
    )
    assert out.status_code == 200 and calls[0] == 2
    assert len(sleep.delays) == 1
    assert 7.0 <= sleep.delays[0] <= 7.0 + FAST.base_s + 0.2 * 7.0


def test_retry_after_http_date_and_cap() -> None:
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    send, _ = scripted(
        resp(503, **{"Retry-After": date}), resp(429, **{"Retry-After": "9999"}), resp(200)
    )
    sleep = FakeSleep()
    penalties: list[float] = []
    run(
        call_with_retry(
            send,
            policy=FAST,
            budget=None,
            idempotent=True,
            what="GET /x",
            sleep=sleep,
            on_retry_after=penalties.append,
        )
    )
    assert 18.0 <= sleep.delays[0] <= 20.0 + FAST.base_s + 4.0 + 0.1
    assert 120.0 <= sleep.delays[1] <= 120.0 + FAST.base_s + 24.0
    assert penalties == [120.0]  # only the 429 penalizes, capped


def test_full_jitter_spread_and_bounds() -> None:
    rng = random.Random(1)
    policy = RetryPolicy(base_s=0.5, cap_s=30.0)
    for attempt in (0, 3, 10, 100):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, policy, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 150
        assert max(delays) > 0.7 * ceiling and min(delays) < 0.3 * ceiling


def test_jitter_spreads_clients_told_the_same_retry_after() -> None:
    delays = []
    for seed in range(20):
        send, _ = scripted(resp(429, **{"Retry-After": "3"}), resp(200))
        sleep = FakeSleep()
        run(
            call_with_retry(
                send,
                policy=FAST,
                budget=None,
                idempotent=False,
                what="POST /runs",
                sleep=sleep,
                rng=random.Random(seed),
            )
        )
        delays.append(sleep.delays[0])
    assert all(d >= 3.0 for d in delays) and len(set(delays)) == 20


# -- which failures are retried ---------------------------------------------------


def test_budget_exhaustion_stops_retrying() -> None:
    budget = RetryBudget(2)
    send, calls = scripted(resp(503))
    policy = RetryPolicy(max_attempts=10)
    out = run(
        call_with_retry(
            send, policy=policy, budget=budget, idempotent=True, what="GET /x", sleep=FakeSleep()
        )
    )
    assert out.status_code == 503 and calls[0] == 3 and budget.remaining == 0
    send2, calls2 = scripted(resp(503))
    out2 = run(
        call_with_retry(
            send2, policy=policy, budget=budget, idempotent=True, what="GET /x", sleep=FakeSleep()
        )
    )
    assert out2.status_code == 503 and calls2[0] == 1


def test_max_attempts_then_api_error_without_response() -> None:
    send, calls = scripted(httpx.ReadTimeout("timed out"))
    with pytest.raises(ApiError) as info:
        run(
            call_with_retry(
                send, policy=FAST, budget=None, idempotent=True, what="GET /x", sleep=FakeSleep()
            )
        )
    assert calls[0] == FAST.max_attempts
    assert info.value.status is None and not isinstance(info.value, AmbiguousError)
    assert "GET /x" in str(info.value) and "ReadTimeout" in str(info.value)


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout("t"),
        httpx.RemoteProtocolError("peer closed"),
        httpx.ReadError("reset"),
        resp(502),
        resp(500),
    ],
)
def test_non_idempotent_after_send_is_ambiguous(failure: Outcome) -> None:
    send, calls = scripted(failure, resp(200))
    with pytest.raises(AmbiguousError):
        run(
            call_with_retry(
                send, policy=FAST, budget=None, idempotent=False, what="POST /r", sleep=FakeSleep()
            )
        )
    assert calls[0] == 1


@pytest.mark.parametrize(
    "failure", [httpx.ConnectError("refused"), httpx.ConnectTimeout("t"), resp(429)]
)
def test_non_idempotent_never_sent_is_retried(failure: Outcome) -> None:
    send, calls = scripted(failure, failure, resp(201))
    out = run(
        call_with_retry(
            send, policy=FAST, budget=None, idempotent=False, what="POST /r", sleep=FakeSleep()
        )
    )
    assert out.status_code == 201 and calls[0] == 3


@pytest.mark.parametrize(
    "failure",
    [httpx.ReadTimeout("t"), httpx.RemoteProtocolError("x"), resp(500), resp(502), resp(504)],
)
def test_idempotent_transients_are_retried(failure: Outcome) -> None:
    send, calls = scripted(failure, resp(200))
    out = run(
        call_with_retry(
            send, policy=FAST, budget=None, idempotent=True, what="GET /x", sleep=FakeSleep()
        )
    )
    assert out.status_code == 200 and calls[0] == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422])
def test_client_errors_are_returned_at_once(status: int) -> None:
    for idempotent in (True, False):
        send, calls = scripted(resp(status), resp(200))
        out = run(
            call_with_retry(
                send, policy=FAST, budget=None, idempotent=idempotent, what="X", sleep=FakeSleep()
            )
        )
        assert out.status_code == status and calls[0] == 1


def test_error_messages_scrub_urls() -> None:
    send, _ = scripted(httpx.ConnectError("cannot reach https://h/p?sig=abc&x=1"))
    with pytest.raises(ApiError) as info:
        run(
            call_with_retry(
                send,
                policy=RetryPolicy(max_attempts=1),
                budget=None,
                idempotent=True,
                what="GET https://h/p",
                sleep=FakeSleep(),
            )
        )
    assert "sig=" not in str(info.value)


def test_scrub() -> None:
    from batchrun.retry import scrub

    text = "see https://s.test/k?X-Amz-Signature=1&a=2 and X-Amz-Signature=abc&sig=zz token=t"
    out = scrub(text)
    assert out.startswith("see https://s.test/k and")
    for secret in ("abc", "zz", "Signature=", "sig=", "token=t"):
        assert secret not in out


# -- RateLimiter ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += max(0.0, delay) + 0.0001  # wake-ups are a little late, as in life
        await asyncio.sleep(0)


def _max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[i] - times[j] > window:  # closed window [t - window, t]
            j += 1
        best = max(best, i - j + 1)
        del t
    return best


@pytest.mark.parametrize("rate,per_s", [(5, 1.0), (200, 10.0)])
def test_rate_limiter_never_exceeds_rate_in_any_window(rate: float, per_s: float) -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate, per_s, clock=clock, sleep=clock.sleep)
    grants: list[float] = []
    order: list[int] = []

    async def one(i: int) -> None:
        await limiter.acquire()
        grants.append(clock())
        order.append(i)

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(int(rate) * 3)))

    run(main())
    assert _max_in_window(grants, per_s) <= rate
    assert order == sorted(order)  # FIFO
    # and not much slower than the rate allows (margin is 5%)
    assert grants[-1] - grants[0] <= (len(grants) - 1) * per_s / rate * 1.06 + 0.01


def test_rate_limiter_penalize_and_unlimited() -> None:
    clock = FakeClock()
    limiter = RateLimiter(5, 1.0, clock=clock, sleep=clock.sleep)

    async def main() -> None:
        await limiter.acquire()
        limiter.penalize(10.0)
        t0 = clock()
        await limiter.acquire()
        assert clock() >= t0 + 10.0
        free = RateLimiter(float("inf"), 1.0, clock=clock, sleep=clock.sleep)
        t1 = clock()
        for _ in range(100):
            await free.acquire()
        assert clock() == t1
        free.penalize(2.0)
        await free.acquire()
        assert clock() >= t1 + 2.0
        assert RateLimiter(0, 1.0).unlimited

    run(main())


def test_penalty_during_wait_moves_waiters() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, 1.0, clock=clock, sleep=clock.sleep)
    grants: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        grants.append(clock())

    async def main() -> None:
        await limiter.acquire()
        start = clock()
        task = asyncio.gather(one(), one())
        await asyncio.sleep(0)
        limiter.penalize(5.0)
        await task
        assert min(grants) >= start + 5.0

    run(main())
