"""The value types that flow between the stages: manifest → specs → plan → state.

Everything here is immutable data with no I/O, so every stage can be tested on
its own and the plan stays a pure function of (specs, file facts, state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Transport = Literal["direct", "upload"]
"""How a run's input reaches the service: inline in the create-run body, or
through an upload URL (POST uploadurl → PUT → create with upload_id)."""

Action = Literal["create", "unchanged", "rerun", "resume", "retry", "collect", "error"]
"""What apply will do with a run, decided by the plan from the state file."""

Phase = Literal[
    "planned",
    "uploading",
    "uploaded",
    "submitting",
    "submitted",
    "succeeded",
    "failed",
    "canceled",
    "collected",
]
"""The run state machine (design.md):
planned → uploading → uploaded → submitting → submitted → succeeded|failed|canceled → collected."""

DEFAULT_ENDPOINT = "https://api.cloud.nextmv.io"
EMBEDDED_ENDPOINT = "embedded"
DEFAULT_API_KEY_ENV = "NEXTMV_API_KEY"

MIB = 1024 * 1024
MB = 1000 * 1000


@dataclass(frozen=True)
class Location:
    """Where something stands in a file, 1-based, as people and editors count."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Limits:
    """The service's limits, as settings: plans differ (manifest `limits`, CLI flags)."""

    runs_per_second: float = 5.0
    results_per_10s: float = 200.0
    requests_per_minute: float = 2000.0  # every API request together
    # The official SDK's _MAX_RUN_SIZE, compared with `>` against the compact
    # JSON serialisation of the input.
    direct_input_max_bytes: int = 5 * MIB
    upload_max_bytes: int = 500 * MB
    download_max_bytes: int = 100 * MB
    upload_url_lifetime_s: float = 15 * 60.0


@dataclass(frozen=True)
class RunSpec:
    """One run of the manifest after defaults are merged and globs expanded."""

    name: str
    app: str
    instance: str
    input_path: Path  # absolute
    input_display: str  # as the manifest author would write it (relative to the manifest)
    options: tuple[tuple[str, str], ...]  # sorted by key; values already strings
    output_path: Path  # absolute, proven inside the output root
    description: str | None = None
    timeout_s: float | None = None
    location: Location | None = None
    # The input's stat from validation, so planning need not stat it again
    # (a file changed since is caught by the hash check before it is sent).
    input_stat: os.stat_result | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class EmbeddedSettings:
    """How `endpoint: embedded` starts the built-in emulator.

    `apps` maps an application id to what runs it: an app directory (with
    app.yaml), a command line, or `builtin:echo` / `builtin:sleep`.
    """

    apps: tuple[tuple[str, str], ...] = ()
    capacity: int = 4


@dataclass(frozen=True)
class Manifest:
    path: Path  # absolute path of the manifest file
    version: int
    endpoint: str  # EMBEDDED_ENDPOINT or an http(s) URL
    api_key_env: str
    concurrency: int
    transfers: int
    limits: Limits
    runs: tuple[RunSpec, ...]
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
    output_root: Path | None = None  # None: the manifest's folder


@dataclass(frozen=True)
class FileFacts:
    """What planning needs to know about an input file (cached by stat identity)."""

    size: int
    sha256: str
    # Size of the compact JSON serialisation (SDK rule), or None if the file is
    # not JSON (or too large to be worth parsing: it uploads either way).
    compact_json_bytes: int | None


@dataclass(frozen=True)
class RunRecord:
    """One row of the state store: where a manifest entry stands."""

    name: str
    fingerprint: str
    phase: Phase
    key: str | None = None  # client-made key carried in the run's description
    attempt: int = 0
    upload_id: str | None = None
    uploaded_at: float | None = None  # epoch seconds the upload URL was issued
    run_id: str | None = None
    output_path: str | None = None
    output_sha256: str | None = None
    output_bytes: int | None = None
    error: str | None = None
    history: tuple[str, ...] = ()  # earlier run ids of this entry
    updated_at: float = 0.0


@dataclass(frozen=True)
class PlannedRun:
    spec: RunSpec
    bytes: int
    transport: Transport
    action: Action
    fingerprint: str
    reason: str = ""  # why this action (shown by `plan`, e.g. "options changed")
    record: RunRecord | None = None


@dataclass(frozen=True)
class PlanSummary:
    counts: tuple[tuple[Action, int], ...]
    uploads: int
    upload_bytes: int
    pending: bool  # anything for apply to do


@dataclass(frozen=True)
class Plan:
    runs: tuple[PlannedRun, ...]
    summary: PlanSummary
