"""Shared plumbing for the bench/ scripts (issue 6).

* The emulator runs as its own process (``python -m batchrun.emulator``), so the
  CPU time and peak RSS measured for a client are the client's own.
* batchrun runs as a subprocess (``python -m batchrun apply ...``); its wall
  time, CPU seconds and peak RSS come from ``os.wait4`` on that child.
* Every figure is a list of repetitions: ``summary()`` gives median and spread.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
API_KEY = "bench-key-0123456789"
KEY_ENV = "BATCHRUN_BENCH_KEY"
API_ROUTES = ("uploadurl", "create", "metadata", "result", "output", "list", "cancel")
# "A user on a higher plan": limits far above what loopback can reach.
HIGH_LIMITS = {
    "runs_per_second": 100000,
    "results_per_10s": 1000000,
    "requests_per_minute": 6000000,
}


# -- the emulator as its own process ----------------------------------------


class Emulator:
    def __init__(self, proc: subprocess.Popen[str], info: dict[str, Any]) -> None:
        self.proc = proc
        self.api_url: str = info["api_url"]
        self.storage_url: str = info["storage_url"]
        self._http = httpx.Client(timeout=30)

    def stats(self) -> dict[str, Any]:
        r = self._http.get(f"{self.api_url}/_emulator/stats")
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def reset_stats(self) -> None:
        self._http.post(f"{self.api_url}/_emulator/reset-stats").raise_for_status()

    def set_faults(self, **knobs: Any) -> None:
        self._http.post(f"{self.api_url}/_emulator/faults", json=knobs).raise_for_status()

    def api_requests(self) -> int:
        by_route = self.stats()["requests_by_route"]
        return sum(int(by_route.get(r, 0)) for r in API_ROUTES)

    def stop(self) -> None:
        self._http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def emulator(
    data_dir: Path,
    *,
    apps: Sequence[str] = ("echo=builtin:echo", "sleep=builtin:sleep"),
    capacity: int = 64,
    rate_limits: bool = False,
    faults: dict[str, Any] | None = None,
) -> Iterator[Emulator]:
    args = [PY, "-m", "batchrun.emulator", "--port", "0", "--api-key", API_KEY]
    args += ["--data-dir", str(data_dir), "--capacity", str(capacity)]
    for app in apps:
        args += ["--app", app]
    if rate_limits:
        args.append("--rate-limits")
    for knob, value in (faults or {}).items():
        args += ["--fault", f"{knob}={json.dumps(value)}"]
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=10)
        raise RuntimeError(f"emulator exited with {proc.returncode} before it was ready")
    emu = Emulator(proc, json.loads(line))
    try:
        yield emu
    finally:
        emu.stop()


# -- measured child processes -------------------------------------------------


@dataclass
class Measured:
    argv: list[str]
    rc: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    stdout: str
    stderr: str


def run_measured(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 900,
) -> Measured:
    """Run a child; wall time, its own CPU (user+sys) and peak RSS from wait4."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.005)
        wall = time.perf_counter() - started
        rc = os.waitstatus_to_exitcode(status)
        proc.returncode = rc
        out.seek(0)
        err.seek(0)
        return Measured(
            argv=list(argv),
            rc=rc,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            maxrss_mb=usage.ru_maxrss / 1024,  # KiB on Linux
            stdout=out.read(),
            stderr=err.read(),
        )


def batchrun_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHRUN_")}
    env[KEY_ENV] = API_KEY
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def batchrun(*args: str | Path, cwd: Path | None = None, timeout: float = 900) -> Measured:
    return run_measured(
        [PY, "-m", "batchrun", *map(str, args)], env=batchrun_env(), cwd=cwd, timeout=timeout
    )


def done_summary(m: Measured) -> dict[str, Any]:
    """The `done` event of an `apply --json` run."""
    for line in reversed(m.stdout.splitlines()):
        if line.startswith("{") and '"type": "done"' in line:
            data: dict[str, Any] = json.loads(line)["data"]
            return data
    raise BenchError(f"no done event (rc {m.rc}): {m.stderr[-2000:]}")


# -- inputs, manifests, checks -------------------------------------------------


def run_main(main: Callable[[], int]) -> None:
    """A benchmark script's entry: a wrong result is exit 1 with one line, a
    missed target is not (the script printed MISSED with its figure)."""
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"WRONG RESULT: {exc}", file=sys.stderr)
        sys.exit(1)


class BenchError(Exception):
    """A result is wrong: the benchmark exits non-zero."""


def compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def make_inputs(folder: Path, n: int, *, prefix: str = "in") -> dict[str, str]:
    """n small compact-JSON inputs; returns {stem: sha256 of the bytes sent}."""
    folder.mkdir(parents=True, exist_ok=True)
    old = time.time() - 3600  # older than the hash cache's racy window
    digests: dict[str, str] = {}
    for i in range(n):
        stem = f"{prefix}-{i:05d}"
        data = compact({"id": i, "items": [{"w": i % 7, "v": i % 11}] * 4})
        p = folder / f"{stem}.json"
        p.write_bytes(data)
        os.utime(p, (old, old))
        digests[stem] = hashlib.sha256(data).hexdigest()
    return digests


def write_manifest(
    path: Path,
    *,
    endpoint: str,
    app: str = "echo",
    concurrency: int = 64,
    limits: dict[str, Any] | None = None,
    options: dict[str, str] | None = None,
    input_glob: str = "in/*.json",
    transfers: int | None = None,
    output: str = "out/{name}.json",
) -> Path:
    doc: dict[str, Any] = {
        "version": 1,
        "app": app,
        "endpoint": endpoint,
        "api_key_env": KEY_ENV,
        "concurrency": concurrency,
    }
    if transfers is not None:
        doc["transfers"] = transfers
    if limits:
        doc["limits"] = limits
    defaults: dict[str, Any] = {"output": output}
    if options:
        defaults["options"] = options
    doc["defaults"] = defaults
    doc["runs"] = [{"name": "{stem}", "input": input_glob}]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def check_echo_outputs(
    out_dir: Path, digests: dict[str, str], options: dict[str, str] | None = None
) -> None:
    """Every run's output exists and echoes its own input's hash (and options)."""
    bad: list[str] = []
    for stem, sha in digests.items():
        p = out_dir / f"{stem}.json"
        try:
            body = json.loads(p.read_bytes())
        except (OSError, ValueError) as exc:
            bad.append(f"{stem}: {exc}")
            continue
        if body.get("input_sha256") != sha:
            bad.append(f"{stem}: wrong input hash")
        elif options is not None and body.get("options") != options:
            bad.append(f"{stem}: wrong options {body.get('options')}")
        if len(bad) > 5:
            break
    if bad:
        raise BenchError(f"{len(bad)}+ wrong outputs: " + "; ".join(bad[:5]))


def check_apply(m: Measured, runs: int) -> dict[str, Any]:
    """apply exited 0 and collected every run; returns its summary."""
    if m.rc != 0:
        raise BenchError(f"apply exited {m.rc}: {m.stderr[-2000:]}")
    s = done_summary(m)
    counts = s.get("counts", {})
    if counts.get("collected", 0) != runs:
        raise BenchError(f"apply collected {counts} of {runs} runs; failures {s.get('failures')}")
    return s


# -- figures -----------------------------------------------------------------------


@dataclass
class Figure:
    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def fmt(self, digits: int = 2) -> str:
        if len(self.values) == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.lo:.{digits}f}–{self.hi:.{digits}f}]"

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.lo, "max": self.hi, "values": self.values}


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def save_results(path: str | None, name: str, data: dict[str, Any]) -> None:
    if not path:
        return
    p = Path(path)
    existing: dict[str, Any] = json.loads(p.read_text()) if p.exists() else {}
    existing[name] = data
    p.write_text(json.dumps(existing, indent=1, default=str))


def bench_args(description: str | None) -> Any:
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--results", default=None, help="merge figures into this JSON file")
    return ap


def apply_once(
    emu: Emulator,
    root: Path,
    tag: str,
    digests: dict[str, str],
    *,
    options: dict[str, str] | None = None,
    **manifest: Any,
) -> tuple[Measured, dict[str, Any], dict[str, Any]]:
    """One checked `apply --json` of the inputs in root/in against `emu` (stats reset
    first); returns (measurement, apply summary, emulator stats after)."""
    out = f"out-{tag}"
    path = write_manifest(
        root / f"{tag}.yaml",
        endpoint=emu.api_url,
        output=out + "/{name}.json",
        options=options,
        **manifest,
    )
    emu.reset_stats()
    m = batchrun("apply", path, "--json", cwd=root)
    summary = check_apply(m, len(digests))
    stats = emu.stats()
    if stats["runs_created"] != len(digests):
        raise BenchError(f"{stats['runs_created']} runs created for {len(digests)}")
    check_echo_outputs(root / out, digests, options)
    return m, summary, stats
