"""Seeded, deterministic fault injection and the service's rate limits.

Every decision draws from one `random.Random(seed)` in request arrival order,
so a test that sends the same requests in the same order sees the same faults.
Knobs can change while the emulator runs (`FaultInjector.update`).

Route classes (the keys used by `error_routes`, `fail_next`, stats):
``uploadurl``, ``create``, ``metadata``, ``result``, ``output``, ``list``,
``cancel`` (API origin) and ``upload``, ``download`` (storage origin).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Literal

from batchrun.errors import UsageError

API_ROUTES = ("uploadurl", "create", "metadata", "result", "output", "list", "cancel")
STORAGE_ROUTES = ("upload", "download")
ROUTES = API_ROUTES + STORAGE_ROUTES

RetryAfterFormat = Literal["seconds", "date", "alternate"]
LostCreateMode = Literal["502", "reset", "alternate"]


@dataclass(frozen=True)
class FaultConfig:
    """Fault knobs; all off by default. Rates are probabilities in [0, 1]."""

    # 5xx (502/503/504, picked by the seeded generator) on the routes in
    # `error_routes` (empty: every API and storage route).
    error_rate: float = 0.0
    error_routes: tuple[str, ...] = ()
    # 429 with Retry-After (same route filter as error_rate).
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    retry_after_format: RetryAfterFormat = "alternate"  # seconds, HTTP-date, or both in turn
    # Seconds added before answering every API call (not storage, not /_emulator).
    latency_s: float = 0.0
    # Connection closed without a response (TCP RST), same route filter.
    reset_rate: float = 0.0
    # create-run: the run IS created, then the answer is lost (502 or a reset).
    lost_create_rate: float = 0.0
    lost_create_mode: LostCreateMode = "502"
    lose_next_creates: int = 0  # deterministic: the next K creations lose their answer
    # The next K upload URLs issued are already expired.
    expire_uploads: int = 0
    # Lifetime of new upload URLs (overrides EmulatorConfig.upload_url_lifetime_s);
    # expiry is checked both before and after the body is received, so a short
    # lifetime makes a slow upload expire mid-transfer.
    upload_url_lifetime_s: float | None = None
    # Output downloads: send Content-Length N, then reset after N/2 bytes.
    cut_download_rate: float = 0.0
    # Uploads: read half of the body (Content-Length), then reset the connection.
    cut_upload_rate: float = 0.0
    # Seconds the storage origin waits after an upload body is in, before it checks
    # the URL's expiry again: with a short upload_url_lifetime_s, a deterministic
    # "expired mid-transfer".
    storage_latency_s: float = 0.0
    # Runs fail with an injected error instead of executing.
    run_failure_rate: float = 0.0
    # Deterministic: fail the next K requests of a route class with `fail_next_status`
    # (0 = connection reset). Given as ((route, K), ...) or, to replace(), a dict.
    fail_next: tuple[tuple[str, int], ...] = ()
    fail_next_status: int = 503

    def replace(self, **knobs: Any) -> FaultConfig:
        """A copy with `knobs` changed; unknown knobs or bad values raise UsageError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(knobs) - names)
        if unknown:
            raise UsageError(f"unknown fault knob(s): {', '.join(unknown)}; known: {sorted(names)}")
        fixed: dict[str, Any] = {}
        for name, value in knobs.items():
            if name == "fail_next" and isinstance(value, dict):
                value = tuple((str(k), int(v)) for k, v in value.items())
            elif name == "fail_next":
                value = tuple((str(k), int(v)) for k, v in value)
            elif name == "error_routes":
                value = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
            elif name in ("lose_next_creates", "expire_uploads", "fail_next_status"):
                value = int(value)
            elif name == "upload_url_lifetime_s":
                value = None if value is None else float(value)
            elif name in ("retry_after_format", "lost_create_mode"):
                value = str(value)
            else:
                value = float(value)
            fixed[name] = value
        new = dataclasses.replace(self, **fixed)
        new.validate()
        return new

    def validate(self) -> None:
        for name in ("error_rate", "rate_429", "reset_rate", "lost_create_rate"):
            _check_rate(name, getattr(self, name))
        for name in ("cut_download_rate", "cut_upload_rate", "run_failure_rate"):
            _check_rate(name, getattr(self, name))
        for route in self.error_routes + tuple(r for r, _ in self.fail_next):
            if route not in ROUTES:
                raise UsageError(f"unknown route class {route!r}; known: {', '.join(ROUTES)}")
        if self.retry_after_format not in ("seconds", "date", "alternate"):
            raise UsageError("retry_after_format must be seconds, date or alternate")
        if self.lost_create_mode not in ("502", "reset", "alternate"):
            raise UsageError("lost_create_mode must be 502, reset or alternate")
        if self.latency_s < 0 or self.retry_after_s < 0 or self.storage_latency_s < 0:
            raise UsageError("latency_s, storage_latency_s and retry_after_s must be >= 0")


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"fault knob {name} must be between 0 and 1, got {value}")


@dataclass
class Decision:
    """What to do with one request, decided on arrival."""

    kind: Literal["ok", "error", "429", "reset"] = "ok"
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class FaultInjector:
    """Draws fault decisions from a seeded generator; thread-safe."""

    def __init__(self, config: FaultConfig, seed: int) -> None:
        config.validate()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._config = config
        self._fail_next: dict[str, int] = dict(config.fail_next)
        self._lose_next = config.lose_next_creates
        self._expire_next = config.expire_uploads
        self._retry_after_count = 0
        self._lost_count = 0
        self.injected: dict[str, int] = {}

    @property
    def config(self) -> FaultConfig:
        return self._config

    def update(self, **knobs: Any) -> FaultConfig:
        with self._lock:
            self._config = self._config.replace(**knobs)
            if "fail_next" in knobs:
                self._fail_next = dict(self._config.fail_next)
            if "lose_next_creates" in knobs:
                self._lose_next = self._config.lose_next_creates
            if "expire_uploads" in knobs:
                self._expire_next = self._config.expire_uploads
            return self._config

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = dataclasses.asdict(self._config)
            out["fail_next"] = dict(self._fail_next)
            out["lose_next_creates"] = self._lose_next
            out["expire_uploads"] = self._expire_next
            return out

    def _count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1

    def reset_counts(self) -> None:
        with self._lock:
            self.injected = {}

    def _chance(self, rate: float) -> bool:
        # Always draw when the knob is on, so decisions depend only on order.
        return rate > 0 and self._rng.random() < rate

    def decide(self, route: str) -> Decision:
        """The fault (if any) for a request of `route` class, before it is handled."""
        with self._lock:
            cfg = self._config
            pending = self._fail_next.get(route, 0)
            if pending > 0:
                self._fail_next[route] = pending - 1
                if cfg.fail_next_status == 0:
                    self._count("reset")
                    return Decision("reset")
                self._count(f"fail_next_{cfg.fail_next_status}")
                if cfg.fail_next_status == 429:
                    return Decision("429", 429, self._retry_after_locked())
                if cfg.fail_next_status == 503:  # like error_rate's 503s: with Retry-After
                    return Decision("error", 503, self._retry_after_locked())
                return Decision("error", cfg.fail_next_status)
            applies = not cfg.error_routes or route in cfg.error_routes
            if not applies:
                return Decision()
            if self._chance(cfg.reset_rate):
                self._count("reset")
                return Decision("reset")
            if self._chance(cfg.rate_429):
                self._count("429")
                return Decision("429", 429, self._retry_after_locked())
            if self._chance(cfg.error_rate):
                status = self._rng.choice((502, 503, 504))
                self._count(f"{status}")
                headers = {}
                if status == 503:
                    headers = self._retry_after_locked()
                return Decision("error", status, headers)
            return Decision()

    def retry_after(self, seconds: float | None = None) -> dict[str, str]:
        with self._lock:
            return self._retry_after_locked(seconds)

    def _retry_after_locked(self, seconds: float | None = None) -> dict[str, str]:
        cfg = self._config
        wait = cfg.retry_after_s if seconds is None else seconds
        fmt = cfg.retry_after_format
        if fmt == "alternate":
            fmt = "seconds" if self._retry_after_count % 2 == 0 else "date"
        self._retry_after_count += 1
        if fmt == "seconds":
            return {"Retry-After": str(max(0, int(-(-wait // 1))))}
        # An HTTP-date has one-second resolution: round up so it is never early.
        return {"Retry-After": formatdate(time.time() + wait + 1, usegmt=True)}

    def lose_create(self) -> Literal["", "502", "reset"]:
        """After a run was created: lose its answer? ("" = no)."""
        with self._lock:
            cfg = self._config
            lose = False
            if self._lose_next > 0:
                self._lose_next -= 1
                lose = True
            elif self._chance(cfg.lost_create_rate):
                lose = True
            if not lose:
                return ""
            mode = cfg.lost_create_mode
            if mode == "alternate":
                mode = "502" if self._lost_count % 2 == 0 else "reset"
            self._lost_count += 1
            self._count(f"lost_create_{mode}")
            return "502" if mode == "502" else "reset"

    def upload_lifetime(self, default: float) -> float:
        """Lifetime of the next upload URL: negative when it must be already expired."""
        with self._lock:
            if self._expire_next > 0:
                self._expire_next -= 1
                self._count("expired_upload_url")
                return -1.0
            lifetime = self._config.upload_url_lifetime_s
            return default if lifetime is None else lifetime

    def cut_download(self) -> bool:
        with self._lock:
            if self._chance(self._config.cut_download_rate):
                self._count("cut_download")
                return True
            return False

    def cut_upload(self) -> bool:
        with self._lock:
            if self._chance(self._config.cut_upload_rate):
                self._count("cut_upload")
                return True
            return False

    def run_failure(self) -> bool:
        with self._lock:
            if self._chance(self._config.run_failure_rate):
                self._count("run_failure")
                return True
            return False

    def latency(self) -> float:
        return self._config.latency_s

    def storage_latency(self) -> float:
        return self._config.storage_latency_s

    def note_expired(self) -> None:
        with self._lock:
            self._count("expired_rejected")


class SlidingWindowLimiter:
    """At most `limit` events per `window` seconds; answers how long to wait if over."""

    def __init__(self, limit: float, window: float) -> None:
        self.limit = max(1, int(limit))
        self.window = window
        self._events: deque[float] = deque()
        self._lock = threading.Lock()

    def acquire(self, now: float | None = None) -> float:
        """0.0 if allowed (and counted); otherwise seconds until a slot frees."""
        t = time.monotonic() if now is None else now
        with self._lock:
            while self._events and self._events[0] <= t - self.window:
                self._events.popleft()
            if len(self._events) < self.limit:
                self._events.append(t)
                return 0.0
            return max(0.001, self._events[0] + self.window - t)
