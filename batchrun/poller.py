"""One poller for every run in flight, within the service's request rates."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .client import ApiClient, RunState
from .errors import ApiError, AuthError

log = logging.getLogger(__name__)

# The first poll of a run goes out at TURNAROUND_LEAD x the 25th percentile of
# the last TURNAROUND_KEEP runs of its app, once TURNAROUND_MIN_SEEN have ended.
TURNAROUND_KEEP = 64
TURNAROUND_MIN_SEEN = 3
TURNAROUND_LEAD = 0.85


class RunLost(Exception):
    """The service no longer knows a run id we recorded (404): safe to create again."""


class PollGaveUp(Exception):
    """Polling kept failing; the run stays `submitted` for the next apply."""


class PollSettings(Protocol):
    @property
    def poll_initial_s(self) -> float: ...
    @property
    def poll_factor(self) -> float: ...
    @property
    def poll_max_s(self) -> float: ...
    @property
    def poll_errors_max(self) -> int: ...


@dataclass
class _Watch:
    app: str
    run_id: str
    future: asyncio.Future[RunState]
    due: float
    interval: float
    deadline: float | None
    busy: bool = False
    errors: int = 0
    started: float = 0.0


class Poller:
    """One poller for every run in flight (not one sleeping task per run).

    Each run is polled first after `poll_initial_s`, then at intervals growing
    by `poll_factor` up to `poll_max_s`, jittered ±20% so runs submitted
    together do not poll in lockstep. The API client's limiter keeps the
    total within the service's result-request rate.

    Once a few runs of an app have finished, a new run of that app is polled
    first shortly before the app's usual turnaround (a low quantile of the
    recent ones, never later than `poll_max_s`), and from there on as above:
    a batch of 2 s runs is polled about twice per run, not six times, and a
    finished run does not sit on the service waiting for a long backoff step.
    """

    def __init__(self, api: ApiClient, settings: PollSettings, rng: random.Random) -> None:
        self._api = api
        self._settings = settings
        self._rng = rng
        self._watches: dict[str, _Watch] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._turnarounds: dict[str, deque[float]] = {}  # app → recent waits to final

    def _expected_s(self, app: str) -> float:
        """A low guess of how long a run of `app` takes to be final (0.0: no history)."""
        seen = self._turnarounds.get(app)
        if not seen or len(seen) < TURNAROUND_MIN_SEEN:
            return 0.0
        ordered = sorted(seen)
        return ordered[len(ordered) // 4] * TURNAROUND_LEAD

    async def wait(self, app: str, run_id: str, timeout_s: float | None) -> RunState:
        now = time.monotonic()
        future: asyncio.Future[RunState] = asyncio.get_running_loop().create_future()
        interval = self._settings.poll_initial_s
        first = max(interval, min(self._expected_s(app), self._settings.poll_max_s))
        self._watches[run_id] = _Watch(
            app=app,
            run_id=run_id,
            future=future,
            due=now + first,
            interval=interval,
            deadline=now + timeout_s if timeout_s else None,
            started=now,
        )
        self._wake.set()
        try:
            return await future
        finally:
            self._watches.pop(run_id, None)

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            next_due: float | None = None
            for watch in list(self._watches.values()):
                if watch.busy or watch.future.done():
                    continue
                if watch.deadline is not None and now >= watch.deadline:
                    watch.future.set_exception(TimeoutError())
                    continue
                if watch.due <= now:
                    watch.busy = True
                    task = asyncio.get_running_loop().create_task(self._check(watch))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    wake_at = (
                        watch.due if watch.deadline is None else min(watch.due, watch.deadline)
                    )
                    next_due = wake_at if next_due is None else min(next_due, wake_at)
            self._wake.clear()
            timeout = None if next_due is None else max(next_due - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _check(self, watch: _Watch) -> None:
        try:
            state = await self._api.run_state(watch.app, watch.run_id)
        except AuthError as exc:
            self._finish(watch, exc)
            return
        except ApiError as exc:
            if exc.status == 404:
                self._finish(watch, RunLost(str(exc)))
                return
            watch.errors += 1
            if watch.errors >= self._settings.poll_errors_max:
                self._finish(watch, PollGaveUp(f"status unknown: {exc}"))
                return
            log.warning("polling %s failed (%s); trying again", watch.run_id, exc)
            self._reschedule(watch)
            return
        if state.status in ("succeeded", "failed", "canceled"):
            seen = self._turnarounds.setdefault(watch.app, deque(maxlen=TURNAROUND_KEEP))
            seen.append(time.monotonic() - watch.started)
            if not watch.future.done():
                watch.future.set_result(state)
            return
        watch.errors = 0
        self._reschedule(watch)

    def _finish(self, watch: _Watch, exc: BaseException) -> None:
        if not watch.future.done():
            watch.future.set_exception(exc)

    def _reschedule(self, watch: _Watch) -> None:
        s = self._settings
        watch.interval = min(watch.interval * s.poll_factor, s.poll_max_s)
        watch.due = time.monotonic() + watch.interval * self._rng.uniform(0.8, 1.2)
        watch.busy = False
        self._wake.set()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
