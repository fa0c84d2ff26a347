"""Client-side rate limiters: batchrun paces itself so the service never has to answer 429.

The service documents its limits as "N requests per window" (5 run creations
per second, 200 result requests per 10 s). A token bucket of size N would
allow a burst of N at a window edge followed by N more just after it, which a
sliding-window enforcer answers with 429. So the limiter spaces requests
evenly, `per_s / rate` apart plus a small margin: then no window of `per_s`
seconds, wherever it starts and whether its ends are open or closed, holds
more than `rate` acquisitions, and a little network jitter between client and
server does not push an extra request into a window.

Waiters are served in the order they called `acquire`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

SPACING_MARGIN_FRACTION = 0.05
"""Requests are spaced (per_s / rate) * (1 + this) apart: 5% below the documented rate."""


class RateLimiter:
    """Evenly spaced slots (no burst allowance), plus penalties after a 429."""

    def __init__(
        self,
        rate: float,
        per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.per_s = per_s
        self._clock = clock
        self._sleep = sleep
        self.unlimited = not (rate > 0 and math.isfinite(rate) and per_s > 0)
        self.interval_s = (
            0.0 if self.unlimited else (per_s / rate) * (1.0 + SPACING_MARGIN_FRACTION)
        )
        self._last_grant = -math.inf
        self._blocked_until = -math.inf  # set by penalize()
        # Grants are serialised: the holder sleeps until its slot, the others queue
        # behind it in arrival order (asyncio.Lock is FIFO). Each slot is measured
        # from the previous *actual* grant, so a late wake-up never compresses spacing.
        self._lock = asyncio.Lock()
        self.waited_s = 0.0  # total time callers spent waiting (for benchmarks)

    def __repr__(self) -> str:
        if self.unlimited:
            return "RateLimiter(unlimited)"
        return f"RateLimiter({self.rate:g} per {self.per_s:g}s)"

    async def acquire(self) -> None:
        """Wait for this caller's slot (FIFO among concurrent callers)."""
        if self.unlimited and self._clock() >= self._blocked_until:
            return
        started = self._clock()
        async with self._lock:
            while True:
                now = self._clock()
                slot = max(self._last_grant + self.interval_s, self._blocked_until)
                if now >= slot:
                    break
                await self._sleep(slot - now)
            self._last_grant = now
        self.waited_s += max(0.0, now - started)

    def penalize(self, delay_s: float) -> None:
        """After a 429 (with its Retry-After): nobody acquires before now + delay_s."""
        if not (delay_s > 0 and math.isfinite(delay_s)):
            return
        until = self._clock() + delay_s
        if until > self._blocked_until:
            self._blocked_until = until
            log.warning("%r: service asked to slow down; pausing %.1fs", self, delay_s)
