"""What executes a run: a command, a Nextmv app directory, or a built-in app.

The Nextmv app protocol: the input on stdin, each option as ``-name value``
arguments, the output on stdout; a non-zero exit is a failure whose error is
the tail of stderr. Input, output and stderr are files (never held in memory).
Cancelling the task kills the process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from batchrun.errors import UsageError

STDERR_TAIL_BYTES = 4000
BUILTINS = ("echo", "sleep")


@dataclass(frozen=True)
class Outcome:
    ok: bool
    error: str = ""
    stderr: str = ""


class App(Protocol):
    description: str

    async def run(
        self, input_path: Path, options: dict[str, str], output_path: Path, work_dir: Path
    ) -> Outcome: ...


def _sha256_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def parse_duration(value: str) -> float:
    """'2', '2.5', '2s', '500ms', '1m' → seconds."""
    v = value.strip().lower()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if v.endswith(suffix):
            return float(v[: -len(suffix)]) * factor
    return float(v)


class BuiltinApp:
    """In-process apps: no process start-up, so benchmarks measure the client.

    ``echo`` answers at once with ``{"input_bytes", "input_sha256", "options"}``;
    ``sleep`` first waits ``options["duration"]`` seconds (default 1).
    """

    def __init__(self, kind: str) -> None:
        if kind not in BUILTINS:
            raise UsageError(f"unknown builtin app {kind!r}; known: builtin:echo, builtin:sleep")
        self.kind = kind
        self.description = f"builtin:{kind}"

    async def run(
        self, input_path: Path, options: dict[str, str], output_path: Path, work_dir: Path
    ) -> Outcome:
        if self.kind == "sleep":
            try:
                duration = parse_duration(options.get("duration", "1"))
            except ValueError:
                return Outcome(False, f"invalid duration option {options.get('duration')!r}")
            await asyncio.sleep(max(0.0, duration))
        size, digest = await asyncio.to_thread(_sha256_file, input_path)
        body = {"input_bytes": size, "input_sha256": digest, "options": options}
        output_path.write_text(json.dumps(body, separators=(",", ":")))
        return Outcome(True)


class CommandApp:
    """A command line (shlex-split) or an app directory's entrypoint."""

    def __init__(self, argv: list[str], cwd: Path | None, description: str) -> None:
        self.argv = argv
        self.cwd = cwd
        self.description = description

    async def run(
        self, input_path: Path, options: dict[str, str], output_path: Path, work_dir: Path
    ) -> Outcome:
        args = list(self.argv)
        for name, value in options.items():
            args += [f"-{name}", value]
        stderr_path = work_dir / (output_path.name + ".stderr")
        with (
            input_path.open("rb") as fin,
            output_path.open("wb") as fout,
            stderr_path.open("wb") as ferr,
        ):
            try:
                proc = await asyncio.create_subprocess_exec(
                    *args,
                    stdin=fin,
                    stdout=fout,
                    stderr=ferr,
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                return Outcome(False, f"could not start app {self.description}: {exc}")
            try:
                code = await proc.wait()
            except asyncio.CancelledError:
                _kill_group(proc.pid)
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.wait())
                raise
        tail = _tail(stderr_path)
        if code != 0:
            last = tail.strip().splitlines()[-1] if tail.strip() else ""
            # The error is the tail of stderr (its last line; error_log.stderr has more).
            message = last or f"app exited with code {code} (no stderr)"
            return Outcome(False, message, tail)
        return Outcome(True, "", tail)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - STDERR_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _app_dir(path: Path) -> CommandApp:
    manifest_path = path / "app.yaml"
    try:
        raw: Any = yaml.safe_load(manifest_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{manifest_path}: expected a mapping")
    app_type = str(raw.get("type", "python"))
    execution = raw.get("execution") or {}
    if not isinstance(execution, dict):
        raise UsageError(f"{manifest_path}: execution must be a mapping")
    entrypoint = execution.get("entrypoint") or ("main.py" if app_type == "python" else "main")
    cwd = path / str(execution.get("cwd") or ".")
    entry = (cwd / str(entrypoint)).resolve()
    if not entry.exists():
        entry = (path / str(entrypoint)).resolve()
    if not entry.exists():
        raise UsageError(f"{manifest_path}: entrypoint {entrypoint} not found")
    if app_type == "python" or entry.suffix == ".py":
        argv = [sys.executable, str(entry)]
    elif entry.suffix == ".jar":
        argv = ["java", "-jar", str(entry)]
    else:
        argv = [str(entry)]
    return CommandApp(argv, cwd.resolve(), f"app directory {path}")


def load_app(spec: str) -> App:
    """Resolve an app spec: ``builtin:NAME``, a directory with app.yaml, or a command."""
    if spec.startswith("builtin:"):
        return BuiltinApp(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "app.yaml").is_file():
            raise UsageError(f"app directory {spec} has no app.yaml")
        return _app_dir(path.resolve())
    try:
        argv = shlex.split(spec)
    except ValueError as exc:
        raise UsageError(f"cannot parse app command {spec!r}: {exc}") from exc
    if not argv:
        raise UsageError("empty app command")
    return CommandApp(argv, None, f"command {argv[0]}")


def parse_app_arg(value: str) -> tuple[str, str]:
    """``APP_ID=COMMAND_OR_DIR`` → (app_id, spec)."""
    app_id, sep, spec = value.partition("=")
    app_id, spec = app_id.strip(), spec.strip()
    if not sep or not app_id or not spec:
        raise UsageError(
            f"invalid app {value!r}: expected APP_ID=COMMAND_OR_DIR "
            "(e.g. knapsack=examples/knapsack or echo=builtin:echo)"
        )
    if not all(c.isalnum() or c in "-_." for c in app_id):
        raise UsageError(f"invalid app id {app_id!r}: use letters, digits, '-', '_' or '.'")
    return app_id, spec
