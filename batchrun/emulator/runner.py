"""Running the two origins: uvicorn servers in one background event loop.

The listening sockets are bound before the servers start, so the URLs (and the
storage signer's base URL) are known up front even with port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from batchrun.emulator.apps import App, load_app
from batchrun.emulator.faults import FaultInjector
from batchrun.emulator.server import EmulatorState, build_api_app
from batchrun.emulator.storage import Signer, build_storage_app
from batchrun.errors import UsageError

if TYPE_CHECKING:
    from batchrun.emulator import EmulatorConfig

READY_TIMEOUT_S = 15.0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            family = socket.AF_INET6
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto
    # says TCP, and without it every response's body segment waited for the client's
    # delayed ACK (~40 ms per request on a kept-alive connection).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(1024)
    return sock


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class RunningEmulator:
    """An emulator serving in a background thread; `stop()` ends it."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        apps: dict[str, App] = {}
        for app_id, spec in config.apps:
            if app_id in apps:
                raise UsageError(f"app {app_id} is given twice")
            apps[app_id] = load_app(spec)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if config.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="batchrun-emulator-")
            data_dir = Path(self._tmp.name)
        else:
            data_dir = Path(config.data_dir)
            data_dir.mkdir(parents=True, exist_ok=True)
        self._api_sock = _bind(config.host, config.port)
        try:
            self._storage_sock = _bind(config.host, config.storage_port)
        except BaseException:
            self._api_sock.close()
            raise
        self.api_url = _url(config.host, self._api_sock)
        self.storage_url = _url(config.host, self._storage_sock)
        self.state = EmulatorState(
            apps=apps,
            api_key=config.api_key,
            capacity=config.capacity,
            data_dir=data_dir,
            faults=FaultInjector(config.faults, config.seed),
            signer=Signer(self.storage_url),
            rate_limits=config.rate_limits,
            runs_per_second=config.runs_per_second,
            results_per_10s=config.results_per_10s,
            upload_url_lifetime_s=config.upload_url_lifetime_s,
        )
        common: dict[str, Any] = {
            "log_level": "warning",
            "access_log": False,  # access logs would carry presigned signatures
            "lifespan": "off",
            "http": "h11",
            "timeout_graceful_shutdown": 2,
        }
        self._api = uvicorn.Server(uvicorn.Config(build_api_app(self.state), **common))
        self._storage = uvicorn.Server(uvicorn.Config(build_storage_app(self.state), **common))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="batchrun-emulator", daemon=True)
        self._stopped = False

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start() / stop()
            self._error = exc
        finally:
            loop.close()

    async def _serve(self) -> None:
        try:
            await asyncio.gather(
                self._api.serve(sockets=[self._api_sock]),
                self._storage.serve(sockets=[self._storage_sock]),
            )
        finally:
            await self.state.shutdown()

    def start(self) -> RunningEmulator:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(READY_TIMEOUT_S / 0.01)):
            if self._api.started and self._storage.started:
                return self
            if not self._thread.is_alive():
                break
            deadline.wait(0.01)
        self.stop()
        raise RuntimeError(f"emulator did not start: {self._error!r}")

    def stats(self) -> dict[str, Any]:
        """The introspection counters (what GET /_emulator/stats answers)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return self.state.stats_json()

        async def read() -> dict[str, Any]:
            return self.state.stats_json()

        return asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=10)

    def set_faults(self, **knobs: Any) -> None:
        """Change fault knobs while running (same names as FaultConfig)."""
        self.state.faults.update(**knobs)

    def reset_stats(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self.state.reset_stats()
            return

        async def reset() -> None:
            self.state.reset_stats()

        asyncio.run_coroutine_threadsafe(reset(), loop).result(timeout=10)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._api.should_exit = True
        self._storage.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        for sock in (self._api_sock, self._storage_sock):
            sock.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_blocking(
    running: RunningEmulator,
    on_ready: Callable[[RunningEmulator], None] | None,
) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (main thread) or the servers stop."""
    import signal

    done = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: object) -> None:
        done.set()

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    try:
        if on_ready is not None:
            on_ready(running)
        while not done.is_set() and running._thread.is_alive():
            done.wait(0.2)
    finally:
        running.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)
