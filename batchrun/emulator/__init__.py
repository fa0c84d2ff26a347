"""A Nextmv-compatible emulator: the runs API, presigned storage, real app execution.

Two origins on two ports (as the real service and its object storage are):
the API origin (``/v1/applications/{app_id}/runs...`` and ``/_emulator/...``)
and the storage origin (``/uploads/{id}``, ``/outputs/{run_id}``, presigned with
``?expires=...&sig=...``). See docs in server.py, storage.py, apps.py, faults.py.

    running = start_emulator(EmulatorConfig(api_key=None, apps=(("echo", "builtin:echo"),)))
    ...  # running.api_url is a manifest's `endpoint`
    running.stop()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from batchrun.emulator.apps import parse_app_arg
from batchrun.emulator.faults import ROUTES, FaultConfig
from batchrun.emulator.runner import RunningEmulator, serve_blocking

__all__ = [
    "ROUTES",
    "EmulatorConfig",
    "FaultConfig",
    "RunningEmulator",
    "parse_app_arg",
    "serve_forever",
    "start_emulator",
]


@dataclass(frozen=True)
class EmulatorConfig:
    api_key: str | None  # None: no auth (embedded mode); else 401 without "Bearer <key>"
    apps: tuple[tuple[str, str], ...]  # (app_id, spec): directory | command | builtin:echo|sleep
    capacity: int = 4  # runs executing at once per app; the rest wait "queued", FIFO
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    storage_port: int = 0  # the storage origin's own port (0 = a free port)
    data_dir: Path | None = None  # uploads, inputs, outputs (a temp dir if None)
    rate_limits: bool = False  # 429 + Retry-After above the limits below
    runs_per_second: float = 5.0
    results_per_10s: float = 200.0  # result + metadata + output requests
    upload_url_lifetime_s: float = 900.0  # also the lifetime of output download links
    seed: int = 0
    faults: FaultConfig = field(default_factory=FaultConfig)


def start_emulator(config: EmulatorConfig) -> RunningEmulator:
    """Start in background threads; returns once both ports accept connections.

    Raises UsageError for a bad app spec or a port that cannot be bound.
    """
    return RunningEmulator(config).start()


def serve_forever(
    config: EmulatorConfig,
    on_ready: Callable[[RunningEmulator], None] | None = None,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; `on_ready` gets the running
    emulator (its api_url / storage_url) before blocking. Prints nothing itself."""
    serve_blocking(start_emulator(config), on_ready)
