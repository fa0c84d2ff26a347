"""Shared helpers of the crash, fault and security suites (reliability.md).

Everything here drives the real CLI in a subprocess against a real emulator on
loopback, and checks what the *server* saw and what is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchrun.model import RunRecord
from batchrun.state import StateStore, default_state_path, manifest_identity
from tests.apply_helpers import cli_env, popen_cli, run_cli

MIB = 1024 * 1024
FULL = os.environ.get("BATCHRUN_FULL") == "1"
SECRET_MARKERS = ("sig=", "x-amz-signature", "signature=")
KEY_RE = re.compile(r"\[batchrun (br-[0-9a-f]{16})\]")


def record_figures(test: str, **figures: Any) -> None:
    """scripts/reliability collects these (one JSON line per test) for docs/reliability.md."""
    target = os.environ.get("BATCHRUN_FIGURES")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps({"test": test, **figures}) + "\n")


def scaled(ci: int, full: int) -> int:
    """An iteration count: small in CI, large with BATCHRUN_FULL=1 (scripts/reliability)."""
    return full if FULL else ci


def compact(path: Path) -> bytes:
    return json.dumps(json.loads(path.read_bytes()), separators=(",", ":")).encode()


def echo_output(stored_input: bytes, options: dict[str, str] | None = None) -> bytes:
    """The exact bytes the emulator's builtin:echo app writes for an input."""
    body = {
        "input_bytes": len(stored_input),
        "input_sha256": hashlib.sha256(stored_input).hexdigest(),
        "options": options or {},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def state_path(manifest: Path) -> Path:
    return default_state_path(manifest)


def load_state(manifest: Path) -> dict[str, RunRecord]:
    """The state as a plan would read it: raises StateError if it does not load."""
    return StateStore.read_only(state_path(manifest), manifest_identity(manifest))


def state_dump(manifest: Path) -> str:
    conn = sqlite3.connect(f"file:{state_path(manifest)}?mode=ro", uri=True)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def assert_no_secret(text: str, api_key: str | None, where: str) -> None:
    lowered = text.lower()
    if api_key:
        assert api_key not in text, f"API key found in {where}"
    for marker in SECRET_MARKERS:
        assert marker not in lowered, f"{marker!r} found in {where}"


def keys_seen_by_server(stats: dict[str, Any]) -> dict[str, int]:
    """Client keys (br-…) of every run the emulator created → runs created with that key."""
    out: dict[str, int] = {}
    for description, n in stats["runs_created_by_description"].items():
        for key in KEY_RE.findall(description):
            out[key] = out.get(key, 0) + n
    return out


def apply_killed_at(
    manifest: Path, api_key: str | None, point: str, *, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = cli_env(api_key, BATCHRUN_CRASH_AT=point)
    return run_cli("apply", manifest, *extra, env=env, timeout=120)


def apply_until_done(
    manifest: Path, api_key: str | None, *, attempts: int = 4, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Apply until exit 0 (faults can leave a run unfinished for the next apply)."""
    result = run_cli("apply", manifest, *extra, api_key=api_key, timeout=300)
    for _ in range(attempts - 1):
        if result.returncode == 0:
            break
        result = run_cli("apply", manifest, *extra, api_key=api_key, timeout=300)
    return result


def kill_when(
    manifest: Path,
    api_key: str | None,
    ready: Callable[[], bool],
    *,
    timeout: float = 60.0,
    extra: tuple[str, ...] = (),
) -> int | None:
    """Start an apply; SIGKILL it as soon as `ready()` is true. Returns its exit code
    (-9 when killed, or its own code if it finished first)."""
    proc = popen_cli("apply", manifest, *extra, env=cli_env(api_key))
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def leftovers(folder: Path) -> list[Path]:
    """Temporary files a transfer or the state store may leave: none may survive as final."""
    return sorted(p for p in folder.rglob("*") if p.name.endswith((".part", ".tmp")))
