"""The --json renderer: every event reaches the stream, in order, within its interval."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from batchrun.events import Event, JsonLinesRenderer


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in stream.getvalue().splitlines()]


def test_without_a_loop_every_event_goes_out_at_once_except_the_skip_burst() -> None:
    out = io.StringIO()
    r = JsonLinesRenderer(out)
    r(Event("start"))
    r(Event("skip", run="a", message="unchanged"))
    r(Event("skip", run="b", message="unchanged"))
    assert [e["type"] for e in lines(out)] == ["start"]  # skips held
    r(Event("phase", run="c", phase="submitted"))
    assert [e.get("run") for e in lines(out)] == [None, "a", "b", "c"]
    r(Event("progress", run="c", data={"bytes": 1}))  # never written
    r(Event("done"))
    r.close()
    assert [e["type"] for e in lines(out)] == ["start", "skip", "skip", "phase", "done"]


def test_in_a_loop_lines_are_written_together_within_the_interval() -> None:
    async def go() -> tuple[int, int, int]:
        out = io.StringIO()
        r = JsonLinesRenderer(out)
        for i in range(50):
            r(Event("phase", run=f"r{i}", phase="submitted"))
        before = len(lines(out))
        await asyncio.sleep(r.FLUSH_INTERVAL_S * 3)
        after = len(lines(out))
        r(Event("warning", message="w"))  # urgent: written at once
        return before, after, len(lines(out))

    before, after, urgent = asyncio.run(go())
    assert (before, after, urgent) == (0, 50, 51)


def test_close_writes_what_is_held() -> None:
    async def go() -> io.StringIO:
        out = io.StringIO()
        r = JsonLinesRenderer(out)
        r(Event("phase", run="x", phase="collected"))
        r.close()
        return out

    assert [e["run"] for e in lines(asyncio.run(go()))] == ["x"]


@pytest.mark.parametrize(
    "event",
    [
        Event("skip", run="in-00001", message="unchanged", time=1795875795.7251),
        Event("phase", run='q"uote\\ é 🚀 \x01', phase="submitted", time=1.0),
        Event("warning", message="line\nbreak \u2028", time=1795875795),
        Event("interrupt", time=0.0004),
        Event("done", data={"counts": {"collected": 2}}, time=5.5),
    ],
)
def test_event_json_is_json_dumps_with_sorted_keys(event: Event) -> None:
    """to_json builds most lines by hand; they must be exactly what the json.dumps
    form (the one that serves events with data) writes."""
    assert event.to_json() == event._to_json_slow()
    assert json.loads(event.to_json())["type"] == event.type
