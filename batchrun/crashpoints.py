"""Crash points for the kill harness: SIGKILL this process at a named step.

`BATCHRUN_CRASH_AT=after_create_response:3` kills the process the third time
the engine passes `after_create_response`. Off in normal use: the variable is
read once, and an unarmed `reach()` is a dictionary lookup.

Points: after_intent (the `submitting` intent is durable, the POST not sent),
after_create_response (the service answered with a run id, not yet recorded),
mid_upload, after_upload, mid_poll (a run is submitted and being polled),
mid_download, after_collect (the output is in place, the state not yet
updated).
"""

from __future__ import annotations

import os
import signal

POINTS = frozenset(
    {
        "after_intent",
        "after_create_response",
        "mid_upload",
        "after_upload",
        "mid_poll",
        "mid_download",
        "after_collect",
    }
)


def _armed() -> dict[str, int]:
    spec = os.environ.get("BATCHRUN_CRASH_AT", "")
    armed: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        if name in POINTS:
            armed[name] = int(count) if count.isdigit() else 1
    return armed


_ARMED = _armed()


def reach(point: str) -> None:
    if not _ARMED or point not in _ARMED:
        return
    _ARMED[point] -= 1
    if _ARMED[point] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
