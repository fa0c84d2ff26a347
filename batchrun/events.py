"""Progress events published by the engine, and the renderers that show them.

The engine and the HTTP layer never print: they emit `Event`s to a sink.  A
renderer decides what a person (or a program) sees: one plain line per
transition in CI, JSON lines with `--json`, a live rich display on a TTY.
The JSON form is a documented interface (docs/events.md): fields are only
ever added, never renamed.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Literal

_quote = json.encoder.encode_basestring_ascii  # json.dumps' own string encoder (C)

EventType = Literal[
    "start",  # the batch begins: data has counts per action
    "phase",  # a run moved to a new phase of the state machine
    "skip",  # a run needs nothing (unchanged)
    "progress",  # bytes moved for an upload or download
    "retry",  # a request is being retried (warning)
    "warning",  # something a person should know, the batch goes on
    "interrupt",  # a stop was requested: nothing new starts
    "done",  # the batch ended: data has the summary
]


@dataclass(frozen=True)
class Event:
    type: EventType
    run: str | None = None
    phase: str | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        if not self.data:
            # What json.dumps(obj, sort_keys=True) writes, built directly: a
            # resumed 10,000-run batch writes 10,000 of these (tests/test_events.py
            # pins the two forms together).
            parts = []
            if self.message:
                parts.append('"message": ' + _quote(self.message))
            if self.phase is not None:
                parts.append('"phase": ' + _quote(self.phase))
            if self.run is not None:
                parts.append('"run": ' + _quote(self.run))
            parts.append('"time": ' + repr(round(self.time, 3)))
            parts.append('"type": ' + _quote(self.type))
            return "{" + ", ".join(parts) + "}"
        return self._to_json_slow()

    def _to_json_slow(self) -> str:
        obj: dict[str, Any] = {"type": self.type, "time": round(self.time, 3)}
        if self.run is not None:
            obj["run"] = self.run
        if self.phase is not None:
            obj["phase"] = self.phase
        if self.message:
            obj["message"] = self.message
        if self.data:
            obj["data"] = self.data
        return json.dumps(obj, sort_keys=True)


Sink = Callable[[Event], None]


def discard(event: Event) -> None:
    """A sink for callers that want no progress (the Python API's default)."""


class JsonLinesRenderer:
    """`--json`: one JSON object per event on stdout, for programs.

    Lines reach the reader within FLUSH_INTERVAL_S: while an event loop runs,
    lines are held and written together once per interval (a batch at 300
    runs/s makes ~1,500 events/s; a write each was ~7% of apply's CPU, and
    PYTHONUNBUFFERED=1, common in CI images, makes every stdout write a
    syscall). `start`, `warning`, `interrupt` and `done` go out at once; the
    burst of `skip`s (10,000 on a resumed batch) goes out with what follows.
    """

    FLUSH_INTERVAL_S = 0.1
    _URGENT = frozenset({"start", "warning", "interrupt", "done"})

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stdout
        self._held: list[str] = []
        self._flush_scheduled = False

    def __call__(self, event: Event) -> None:
        if event.type == "progress":
            return  # byte counts go in the phase events; per-chunk lines would flood pipes
        self._held.append(event.to_json() + "\n")
        if event.type in self._URGENT:
            self._flush()
        elif event.type == "skip":
            pass  # skips come in one burst before the run starts; what follows flushes
        elif not self._schedule_flush():
            self._flush()

    def _schedule_flush(self) -> bool:
        if self._flush_scheduled:
            return True
        # No asyncio imported (plan, validate): no loop can be running.
        aio = sys.modules.get("asyncio")
        if aio is None:
            return False
        try:
            loop = aio.get_running_loop()
        except RuntimeError:
            return False
        self._flush_scheduled = True
        loop.call_later(self.FLUSH_INTERVAL_S, self._flush)
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._held:
            text, self._held = "".join(self._held), []
            self._stream.write(text)
        self._stream.flush()

    def close(self) -> None:
        self._flush()


class PlainRenderer:
    """CI and pipes: one line per transition, nothing that redraws."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr

    def __call__(self, event: Event) -> None:
        if event.type in ("progress", "start", "done"):
            return
        who = f"{event.run}: " if event.run else ""
        what = event.phase or event.type
        text = f"{who}{what}"
        if event.message:
            text += f" ({event.message})"
        self._stream.write(text + "\n")
        if event.type != "skip":  # a burst before the start; what follows flushes it
            self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class LiveRenderer:
    """A terminal: one overall bar, counts per phase, bytes/s for transfers.

    Events only update counters (kept incrementally: a 10,000-run batch sends
    tens of thousands of events); rich redraws from them 8 times a second.
    Warnings and failures are printed above the live area so they stay on screen.
    """

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console(stderr=True)
        self._phases: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        self._total = 0
        self._bytes = 0
        self._started = time.monotonic()
        self._live = Live(console=self._console, refresh_per_second=8, get_renderable=self._render)
        self._live.start()

    def _render(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        counts = self._counts
        finished = counts["collected"] + counts["failed"] + counts["canceled"] + counts["unchanged"]
        elapsed = max(time.monotonic() - self._started, 1e-6)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(
            ProgressBar(total=max(self._total, 1), completed=finished, width=40),
            f"{finished}/{self._total} runs",
            f"{self._bytes / elapsed / 1e6:.1f} MB/s",
        )
        order = ["uploading", "submitting", "submitted", "succeeded", "collected", "failed"]
        parts = [f"{p} {counts[p]}" for p in order if counts[p]]
        if counts["unchanged"]:
            parts.append(f"unchanged {counts['unchanged']}")
        grid.add_row("", " · ".join(parts) or "starting", "")
        return grid

    def _move(self, run: str, phase: str) -> None:
        old = self._phases.get(run)
        if old is not None:
            self._counts[old] -= 1
        self._phases[run] = phase
        self._counts[phase] += 1

    def __call__(self, event: Event) -> None:
        if event.type == "start":
            self._total = int(event.data.get("runs", 0))
        elif event.type == "skip" and event.run:
            self._move(event.run, "unchanged")
        elif event.type == "phase" and event.run and event.phase:
            self._move(event.run, event.phase)
            if event.phase == "failed":
                self._console.print(f"[red]✗ {event.run}[/red]: {event.message}")
        elif event.type == "progress":
            self._bytes += int(event.data.get("bytes", 0))
        elif event.type in ("warning", "retry", "interrupt"):
            who = f"{event.run}: " if event.run else ""
            self._console.print(f"[yellow]{who}{event.message}[/yellow]")

    def close(self) -> None:
        self._live.refresh()
        self._live.stop()
