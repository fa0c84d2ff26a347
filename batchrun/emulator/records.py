"""The emulator's records of runs and uploads, and their JSON shapes.

Shapes follow the official SDK's models (nextmv 1.13.0, nextmv/run.py):
RunInformation (metadata), RunResult (+ output / error_log), Run (list items).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

USER_EMAIL = "emulator@localhost"


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Stats:
    runs_created: int = 0
    runs_created_by_name: dict[str, int] = field(default_factory=dict)
    runs_created_by_description: dict[str, int] = field(default_factory=dict)
    requests_by_route: dict[str, int] = field(default_factory=dict)
    peak_running: int = 0
    peak_concurrent_uploads: int = 0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    storage_auth_headers: int = 0
    api_auth_failures: int = 0
    responses_429: int = 0
    uploads_aborted: int = 0  # the client disconnected mid-body
    # Arrival times (time.time()) of the last REQUEST_TIMES_MAX requests per
    # route class: lets a test measure how long a client waited between tries.
    request_times: dict[str, list[float]] = field(default_factory=dict)


REQUEST_TIMES_MAX = 1000


@dataclass
class Upload:
    app_id: str
    path: Path
    size: int | None = None  # None until the PUT completed


@dataclass
class RunRecord:
    id: str
    seq: int
    app_id: str
    instance_id: str
    name: str
    description: str
    options: dict[str, str]
    configuration: dict[str, Any]
    input_path: Path
    input_size: int
    input_type: str
    output_path: Path
    created_at: float
    inject_failure: bool = False
    status: str = "queued"
    started_at: float | None = None
    ended_at: float | None = None
    output_size: int = 0
    output_type: str = "json"
    error: str = ""
    stderr: str = ""
    statistics: dict[str, Any] | None = None
    task: asyncio.Task[None] | None = None


def duration_ms(run: RunRecord) -> float:
    if run.started_at is None:
        return 0.0
    end = run.ended_at if run.ended_at is not None else time.time()
    return round((end - run.started_at) * 1000.0, 3)


def information(run: RunRecord) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "application_id": run.app_id,
        "application_instance_id": run.instance_id,
        "application_version_id": "",
        "created_at": rfc3339(run.created_at),
        "duration": duration_ms(run),
        "error": run.error,
        "execution_class": "emulator",
        "format": {"input": {"type": run.input_type}, "output": {"type": run.output_type}},
        "input_size": run.input_size,
        "output_size": run.output_size,
        "options": {"request_options": run.options, "active_options": run.options},
        "queuing_disabled": False,
        "queuing_priority": 6,
        "run_type": {"type": "standard"},
        "runtime": "emulator",
        "status": "canceled" if run.status == "canceled" else run.status,
        "status_v2": run.status,
    }
    if run.started_at is not None:
        meta["initiated_at"] = rfc3339(run.started_at)
    if run.statistics is not None:
        meta["statistics"] = run.statistics
    return {
        "id": run.id,
        "name": run.name,
        "description": run.description,
        "user_email": USER_EMAIL,
        "metadata": meta,
    }


def list_item(run: RunRecord) -> dict[str, Any]:
    return {
        "id": run.id,
        "user_email": USER_EMAIL,
        "name": run.name,
        "description": run.description,
        "created_at": rfc3339(run.created_at),
        "application_id": run.app_id,
        "application_instance_id": run.instance_id,
        "application_version_id": "",
        "run_type": {"type": "standard"},
        "execution_class": "emulator",
        "runtime": "emulator",
        "status_v2": run.status,
        "options": run.options,
    }
