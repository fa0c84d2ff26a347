"""Shared fixtures: the Nextmv-compatible emulator on real loopback HTTP.

In-process (fast, for most tests)::

    def test_x(emulator):                      # default apps, key TEST_API_KEY
        emulator.api_url, emulator.storage_url, emulator.api_key
        emulator.set_faults(error_rate=0.5)    # any FaultConfig knob, live
        emulator.stats()["runs_created"]       # GET /_emulator/stats over HTTP

    def test_y(emulator_factory):
        emu = emulator_factory(capacity=1, rate_limits=True, faults={"rate_429": 1.0})

Tests marked @pytest.mark.slow run only with --run-slow, -m slow or
BATCHRUN_RUN_SLOW=1.

As a separate process (for kill / memory tests)::

    def test_z(emulator_process):
        proc = emulator_process(capacity=2)    # same API + .pid, .kill(), .terminate()

Default apps: ``echo`` (builtin:echo), ``sleep`` (builtin:sleep), ``knapsack``
(examples/knapsack directory), ``fail`` (a command that writes to stderr and
exits 1), ``cat`` (a command that copies stdin to stdout).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from batchrun.emulator import EmulatorConfig, FaultConfig, RunningEmulator, start_emulator

REPO_ROOT = Path(__file__).resolve().parent.parent
# `from tests.helpers import ...` works under plain `pytest` too (not only `python -m pytest`).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
KNAPSACK_DIR = REPO_ROOT / "examples" / "knapsack"
TEST_API_KEY = "test-key-0123456789"

_PY = shlex.quote(sys.executable)
FAIL_APP = f"{_PY} -c \"import sys; sys.stderr.write('boom: bad input\\n'); sys.exit(1)\""
CAT_APP = f'{_PY} -c "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer)"'

DEFAULT_APPS: tuple[tuple[str, str], ...] = (
    ("echo", "builtin:echo"),
    ("sleep", "builtin:sleep"),
    ("knapsack", str(KNAPSACK_DIR)),
    ("fail", FAIL_APP),
    ("cat", CAT_APP),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run @pytest.mark.slow tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """@pytest.mark.slow tests are skipped unless --run-slow, BATCHRUN_RUN_SLOW=1 or -m slow."""
    wanted = (
        config.getoption("--run-slow")
        or os.environ.get("BATCHRUN_RUN_SLOW") == "1"
        or "slow" in (config.getoption("markexpr") or "").replace("not slow", "")
    )
    if wanted:
        return
    skip = pytest.mark.skip(reason="slow: use --run-slow or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback tests must not be routed through a proxy from the environment."""
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


class EmulatorHandle:
    """What the fixtures return; the same API in-process and as a subprocess."""

    def __init__(self, api_url: str, storage_url: str, api_key: str | None) -> None:
        self.api_url = api_url
        self.storage_url = storage_url
        self.api_key = api_key

    def headers(self) -> dict[str, str]:
        """Authorization header for raw httpx calls to the API origin."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.api_url}/_emulator/stats", timeout=10)
        r.raise_for_status()
        result: dict[str, Any] = r.json()
        return result

    def set_faults(self, **knobs: Any) -> None:
        r = httpx.post(f"{self.api_url}/_emulator/faults", json=knobs, timeout=10)
        r.raise_for_status()

    def reset_stats(self) -> None:
        httpx.post(f"{self.api_url}/_emulator/reset-stats", timeout=10).raise_for_status()

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class InProcessEmulator(EmulatorHandle):
    def __init__(self, running: RunningEmulator, api_key: str | None) -> None:
        super().__init__(running.api_url, running.storage_url, api_key)
        self.running = running

    def set_faults(self, **knobs: Any) -> None:
        self.running.set_faults(**knobs)

    def stop(self) -> None:
        self.running.stop()


class ProcessEmulator(EmulatorHandle):
    def __init__(self, proc: subprocess.Popen[str], info: dict[str, Any], api_key: str | None):
        super().__init__(info["api_url"], info["storage_url"], api_key)
        self.proc = proc
        self.pid = proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def stop(self) -> None:
        self.terminate()


def _config(tmp_path: Path, **kwargs: Any) -> EmulatorConfig:
    faults = kwargs.pop("faults", None)
    extra_apps = tuple(kwargs.pop("extra_apps", ()))
    kwargs.setdefault("api_key", TEST_API_KEY)
    kwargs.setdefault("apps", DEFAULT_APPS)
    kwargs["apps"] = tuple(kwargs["apps"]) + extra_apps
    kwargs.setdefault("data_dir", tmp_path)
    if isinstance(faults, dict):
        faults = FaultConfig().replace(**faults)
    if faults is not None:
        kwargs["faults"] = faults
    return EmulatorConfig(**kwargs)


@pytest.fixture
def emulator_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., InProcessEmulator]]:
    """factory(**EmulatorConfig fields, faults={knob: value}, extra_apps=((id, spec),))."""
    started: list[InProcessEmulator] = []

    def make(**kwargs: Any) -> InProcessEmulator:
        cfg = _config(tmp_path_factory.mktemp("emulator"), **kwargs)
        handle = InProcessEmulator(start_emulator(cfg), cfg.api_key)
        started.append(handle)
        return handle

    yield make
    for h in started:
        h.stop()


@pytest.fixture
def emulator(emulator_factory: Callable[..., InProcessEmulator]) -> InProcessEmulator:
    """An emulator with the default apps, key TEST_API_KEY, no faults, no rate limits."""
    return emulator_factory()


@pytest.fixture
def emulator_process(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ProcessEmulator]]:
    """factory(api_key=..., apps=..., capacity=..., seed=..., rate_limits=..., faults={...},
    extra_args=[...]) → ProcessEmulator running `python -m batchrun.emulator`."""
    started: list[ProcessEmulator] = []

    def make(**kwargs: Any) -> ProcessEmulator:
        api_key = kwargs.pop("api_key", TEST_API_KEY)
        apps = tuple(kwargs.pop("apps", DEFAULT_APPS)) + tuple(kwargs.pop("extra_apps", ()))
        data_dir = kwargs.pop("data_dir", tmp_path_factory.mktemp("emulator-proc"))
        args = [
            sys.executable,
            "-m",
            "batchrun.emulator",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
        ]
        if api_key is not None:
            args += ["--api-key", api_key]
        for app_id, spec in apps:
            args += ["--app", f"{app_id}={spec}"]
        for knob, value in (kwargs.pop("faults", None) or {}).items():
            args += ["--fault", f"{knob}={json.dumps(value)}"]
        if kwargs.pop("rate_limits", False):
            args.append("--rate-limits")
        for name in ("capacity", "seed", "storage_port", "upload_url_lifetime_s"):
            if name in kwargs:
                args += [f"--{name.replace('_', '-')}", str(kwargs.pop(name))]
        args += list(kwargs.pop("extra_args", ()))
        if kwargs:
            raise TypeError(f"unknown emulator_process options: {sorted(kwargs)}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=10)
            raise RuntimeError(
                f"emulator process exited with {proc.returncode} before it was ready"
            )
        handle = ProcessEmulator(proc, json.loads(line), api_key)
        started.append(handle)
        return handle

    yield make
    for h in started:
        h.terminate()
