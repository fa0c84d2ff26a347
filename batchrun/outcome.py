"""What an apply did: per-run outcomes, totals, the `done` event's summary.

Kept apart from the engine so that an apply with nothing to do reports
without loading the engine, asyncio or the HTTP stack (a resumed 10,000-run
batch answers in well under a second).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from .events import Event, Sink
from .model import Plan, PlannedRun

Outcome = Literal["collected", "unchanged", "failed", "canceled", "unfinished"]


@dataclass
class ApplyResult:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    fatal: str | None = None
    fatal_exit_code: int = 1
    interrupted: bool = False
    in_flight: list[tuple[str, str]] = field(
        default_factory=list
    )  # (name, run_id) left on the service
    wall_s: float = 0.0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    api_requests: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.outcomes.values()))

    @property
    def ok(self) -> bool:
        return (
            self.fatal is None
            and not self.interrupted
            and all(o in ("collected", "unchanged") for o in self.outcomes.values())
        )


def start_event(plan: Plan) -> Event:
    counts = Counter(p.action for p in plan.runs)
    return Event("start", data={"runs": len(plan.runs), "actions": dict(counts)})


def skip_unchanged(p: PlannedRun, result: ApplyResult, emit: Sink) -> None:
    result.outcomes[p.spec.name] = "unchanged"
    emit(Event("skip", run=p.spec.name, message="unchanged"))


def nothing_to_do(plan: Plan, emit: Sink) -> ApplyResult:
    """Apply of a plan with nothing pending: no service, no HTTP stack, no state writes."""
    started = time.monotonic()
    result = ApplyResult()
    emit(start_event(plan))
    for p in plan.runs:
        skip_unchanged(p, result, emit)
    result.wall_s = time.monotonic() - started
    emit(Event("done", data=summary(result)))
    return result


def summary(r: ApplyResult) -> dict[str, object]:
    """The `done` event's data (docs/events.md)."""
    return {
        "counts": r.counts(),
        "failures": dict(sorted(r.errors.items())),
        "fatal": r.fatal,
        "interrupted": r.interrupted,
        "in_flight": [{"run": n, "run_id": i} for n, i in r.in_flight],
        "wall_s": round(r.wall_s, 3),
        "bytes_uploaded": r.bytes_uploaded,
        "bytes_downloaded": r.bytes_downloaded,
        "api_requests": r.api_requests,
    }
