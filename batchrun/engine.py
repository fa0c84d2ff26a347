"""The apply loop: drives every planned run through the state machine.

    planned → uploading → uploaded → submitting → submitted → succeeded → collected
                                                           ↘ failed | canceled

Invariants this module keeps (reliability.md):
- The `submitting` intent, with its client-made key, is durable before the
  create-run POST is sent. After a lost answer or a crash the run is looked
  up by that key (carried in its description) before anything is resent, so
  one entry never makes two service runs.
- Every other transition is staged and group-committed: losing one to a crash
  only repeats an idempotent step (a poll, an upload, a download).
- `concurrency` workers bound the runs in flight on the service; a separate
  semaphore bounds transfers; waiting on the service holds no transfer slot.
- One poller serves every run in flight, with adaptive, jittered intervals.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from . import crashpoints
from .errors import AmbiguousError, ApiError, AuthError, BatchrunError, DiskError, TransferError
from .events import Event, Sink
from .model import FileFacts, Limits, Plan, PlannedRun, RunRecord
from .outcome import ApplyResult, skip_unchanged, start_event, summary
from .poller import Poller, PollGaveUp, RunLost
from .state import StateStore
from .statewriter import StateWriter

if TYPE_CHECKING:
    # Types only: an apply with nothing to do never loads the HTTP stack.
    from .client import ApiClient, RunState
    from .transfer import StorageClient

log = logging.getLogger(__name__)

# An upload id older than this (relative to the URL lifetime) is not trusted
# for a create-run: the input is uploaded again rather than risk a 4xx.
UPLOAD_REUSE_MARGIN_S = 60.0
# After a lost create answer the service may need a moment to list the run.
RECONCILE_SETTLE_S = 1.0
# Each resend follows a lookup that found no run with the key, so it cannot
# duplicate; the bound only keeps a failing service from holding a run forever.
CREATE_ATTEMPTS_MAX = 8
TRANSFER_ATTEMPTS_MAX = 3
COLLECTABLE = ("succeeded", "collected")
INLINE_READ_MAX_BYTES = 256 << 10  # direct inputs up to this are read on the loop


@dataclass(frozen=True)
class EngineSettings:
    concurrency: int = 8
    transfers: int = 4
    limits: Limits = field(default_factory=Limits)
    fail_fast: bool = False
    poll_initial_s: float = 0.1
    poll_factor: float = 1.6
    poll_max_s: float = 10.0
    # A poll that keeps failing (after the client's own retries) gives up
    # after this many rounds: the run stays `submitted` for the next apply.
    poll_errors_max: int = 5
    seed: int | None = None


class RunFailed(Exception):
    """A run ended on the service (or was refused by it) without output."""

    def __init__(self, message: str, *, phase: Literal["failed", "canceled"] = "failed") -> None:
        super().__init__(message)
        self.phase = phase


class RunUnfinished(Exception):
    """A run could not be driven further now; its state allows the next apply to resume it."""


def new_key() -> str:
    """A client-made key carried in the run's description, found again by listing."""
    return "br-" + secrets.token_hex(8)


def describe(description: str | None, key: str) -> str:
    marker = f"[batchrun {key}]"
    return f"{description} {marker}" if description else marker


class Engine:
    """Applies a plan. Construct, then `await run()`; `interrupt()` from a signal handler."""

    def __init__(
        self,
        plan: Plan,
        facts: Mapping[Path, FileFacts],
        store: StateStore,
        api: ApiClient,
        storage: StorageClient,
        settings: EngineSettings,
        emit: Sink,
    ) -> None:
        self._plan = plan
        self._facts = facts
        self._writer = StateWriter(store)
        self._api = api
        self._storage = storage
        self._settings = settings
        self._emit = emit
        self._rng = random.Random(settings.seed)
        self._result = ApplyResult()
        self._no_new = False  # fail-fast or a fatal error: start nothing new
        self._main: asyncio.Task[None] | None = None
        self._transfer_slots = asyncio.Semaphore(settings.transfers)
        self._collect_queue: asyncio.Queue[tuple[PlannedRun, RunRecord, RunState | None] | None]
        self._in_flight: dict[str, str] = {}  # name → run id, while on the service

    # -- public -------------------------------------------------------------

    async def run(self) -> ApplyResult:
        started = time.monotonic()
        self._collect_queue = asyncio.Queue()
        self._main = asyncio.current_task()
        self._emit(start_event(self._plan))
        try:
            await self._run_all()
        except asyncio.CancelledError:
            # Cancelled by interrupt() or by a fatal error: either way the
            # state is consistent; what remains is to flush it.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if self._result.fatal is None:
                self._result.interrupted = True
        finally:
            with contextlib.suppress(BaseException):
                await self._writer.drain()
            self._writer.close()
            if self._writer.error is not None and self._result.fatal is None:
                self._result.fatal = str(self._writer.error)
        self._result.in_flight = sorted(self._in_flight.items())
        self._result.wall_s = time.monotonic() - started
        self._result.api_requests = self._api.stats()
        for p in self._plan.runs:
            self._result.outcomes.setdefault(p.spec.name, "unfinished")
        self._emit(Event("done", data=summary(self._result)))
        return self._result

    def interrupt(self) -> None:
        """First Ctrl-C/SIGTERM: start nothing new, stop waiting, keep state consistent."""
        self._result.interrupted = True
        self._no_new = True
        self._emit(Event("interrupt", message="interrupted: saving state and stopping"))
        if self._main is not None:
            self._main.cancel()

    # -- orchestration ------------------------------------------------------

    async def _run_all(self) -> None:
        drive: list[PlannedRun] = []
        for p in self._plan.runs:
            rec = p.record
            if p.action == "unchanged":
                skip_unchanged(p, self._result, self._emit)
            elif p.action == "error":
                self._fail_outcome(p.spec.name, p.reason or "cannot be planned")
            elif p.action == "collect" and rec is not None and rec.phase in COLLECTABLE:
                self._collect_queue.put_nowait((p, rec, None))
            else:
                drive.append(p)
        # Runs already on the service go first: they hold capacity there anyway.
        drive.sort(key=lambda p: 0 if p.action == "resume" else 1)
        queue = iter(drive)
        poller = Poller(self._api, self._settings, self._rng)
        poller_task = asyncio.create_task(poller.run())
        workers = [
            asyncio.create_task(self._worker(queue, poller))
            for _ in range(max(1, min(self._settings.concurrency, len(drive))))
        ]
        collectors = [
            asyncio.create_task(self._collector()) for _ in range(max(1, self._settings.transfers))
        ]
        try:
            await asyncio.gather(*workers)
            for _ in collectors:
                self._collect_queue.put_nowait(None)
            await asyncio.gather(*collectors)
        finally:
            for task in [*workers, *collectors, poller_task]:
                task.cancel()
            poller.close()
            await asyncio.gather(*workers, *collectors, poller_task, return_exceptions=True)

    async def _worker(self, queue: Iterator[PlannedRun], poller: Poller) -> None:
        # Workers share one iterator: each takes the next run when its last one
        # is final on the service, so at most `concurrency` are in flight.
        for p in queue:
            if self._no_new:
                return
            try:
                await self._drive(p, poller)
            except (AuthError, DiskError) as exc:
                self._fatal(exc)
                return

    async def _collector(self) -> None:
        while True:
            item = await self._collect_queue.get()
            if item is None:
                return
            p, rec, state = item
            try:
                await self._collect(p, rec, state)
            except (AuthError, DiskError) as exc:
                self._fatal(exc)
                return
            except RunFailed as exc:
                self._record_failure(p, rec, exc)
            except (RunUnfinished, ApiError, TransferError) as exc:
                self._unfinished(p.spec.name, str(exc))

    def _fatal(self, exc: BatchrunError) -> None:
        if self._result.fatal is None:
            self._result.fatal = str(exc)
            self._result.fatal_exit_code = exc.exit_code
        self._no_new = True
        if self._main is not None and not self._main.done():
            self._main.cancel()

    # -- one run ------------------------------------------------------------

    async def _drive(self, p: PlannedRun, poller: Poller) -> None:
        rec = self._begin(p)
        for _ in range(2):  # a second pass only after the service lost the run (404)
            try:
                if rec.phase in ("planned", "uploading", "uploaded", "submitting"):
                    rec = await self._submit(p, rec)
                rec, state = await self._await_final(p, rec, poller)
            except RunLost:
                self._emit(
                    Event(
                        "warning",
                        run=p.spec.name,
                        message="the service lost this run; creating it again",
                    )
                )
                rec = self._restart(p, rec)
                continue
            except RunFailed as exc:
                self._record_failure(p, rec, exc)
                return
            except (RunUnfinished, PollGaveUp, ApiError, TransferError) as exc:
                if isinstance(exc, AuthError):
                    raise
                self._unfinished(p.spec.name, str(exc))
                return
            except OSError as exc:  # the input went away or became unreadable since the plan
                self._unfinished(
                    p.spec.name, f"cannot read input {p.spec.input_display}: {exc.strerror or exc}"
                )
                return
            await self._collect_queue.put((p, rec, state))
            return
        self._unfinished(p.spec.name, "the service lost this run twice")

    def _begin(self, p: PlannedRun) -> RunRecord:
        old = p.record
        if old is not None and p.action in ("resume", "collect"):
            return old
        return self._restart(p, old)

    def _restart(self, p: PlannedRun, old: RunRecord | None) -> RunRecord:
        history = old.history if old else ()
        if old is not None and old.run_id and old.run_id not in history:
            history = (*history, old.run_id)
        rec = RunRecord(
            name=p.spec.name,
            fingerprint=p.fingerprint,
            phase="planned",
            key=new_key(),
            attempt=(old.attempt + 1) if old else 1,
            history=history,
        )
        self._writer.stage(rec)
        return rec

    async def _submit(self, p: PlannedRun, rec: RunRecord) -> RunRecord:
        spec = p.spec
        key = rec.key
        assert key is not None, "every record that reaches submit has a key"
        if rec.phase == "submitting":
            # The previous apply may have sent this create: adopt, never resend blindly.
            found = await self._reconcile(spec.app, key, settle=False)
            if found:
                return await self._submitted(p, rec, found, adopted=True)
        if self._no_new:
            raise RunUnfinished("not started: the batch is stopping")
        input_json: bytes | None = None
        upload_id: str | None = None
        if p.transport == "direct":
            if p.bytes <= INLINE_READ_MAX_BYTES:
                # Read moments ago by the planner (page cache): cheaper here than a
                # thread hop, whose GIL hand-offs cost more than the read itself.
                input_json = self._read_direct(p)
            else:
                input_json = await asyncio.to_thread(self._read_direct, p)
        elif (
            rec.phase in ("uploaded", "submitting")
            and rec.upload_id
            and rec.uploaded_at is not None
            and time.time() - rec.uploaded_at
            < self._settings.limits.upload_url_lifetime_s - UPLOAD_REUSE_MARGIN_S
        ):
            upload_id = rec.upload_id
        else:
            rec = await self._upload(p, rec)
            upload_id = rec.upload_id
        rec = replace(rec, phase="submitting", upload_id=upload_id, error=None)
        await self._writer.commit(rec)  # durable intent before the POST
        crashpoints.reach("after_intent")
        self._phase(p, "submitting")
        for attempt in range(CREATE_ATTEMPTS_MAX):
            try:
                run_id = await self._api.create_run(
                    spec.app,
                    spec.instance,
                    name=spec.name,
                    description=describe(spec.description, key),
                    options=dict(spec.options),
                    input_json=input_json,
                    upload_id=upload_id,
                )
            except AmbiguousError as exc:
                self._emit(
                    Event(
                        "warning",
                        run=spec.name,
                        message=f"create-run answer lost ({exc}); looking the run up by its key",
                    )
                )
                found = await self._reconcile(spec.app, key, settle=True)
                if found:
                    return await self._submitted(p, rec, found, adopted=True)
                log.warning("run %s not found after a lost answer (try %d)", spec.name, attempt + 1)
                from .retry import backoff_delay

                await asyncio.sleep(backoff_delay(attempt, self._api.policy, self._rng))
                continue
            except AuthError:
                raise
            except ApiError as exc:
                if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                    raise RunFailed(f"refused by the service: {exc}") from exc
                raise RunUnfinished(f"not submitted: {exc}") from exc
            crashpoints.reach("after_create_response")
            return await self._submitted(p, rec, run_id, adopted=False)
        raise RunUnfinished("create-run answers kept getting lost; apply again to reconcile")

    async def _submitted(
        self, p: PlannedRun, rec: RunRecord, run_id: str, *, adopted: bool
    ) -> RunRecord:
        rec = replace(rec, phase="submitted", run_id=run_id)
        self._writer.stage(rec)
        self._in_flight[p.spec.name] = run_id
        self._phase(p, "submitted", f"{run_id} (adopted)" if adopted else run_id)
        return rec

    async def _reconcile(self, app: str, key: str, *, settle: bool) -> str | None:
        found = await self._api.find_runs_by_marker(app, [key])
        if key not in found and settle:
            await asyncio.sleep(RECONCILE_SETTLE_S)
            found = await self._api.find_runs_by_marker(app, [key])
        run = found.get(key)
        return run.run_id if run else None

    def _read_direct(self, p: PlannedRun) -> bytes:
        """The inline input, compact as the SDK sends it, checked against the planned hash."""
        data = p.spec.input_path.read_bytes()
        facts = self._facts.get(p.spec.input_path)
        if facts is not None and hashlib.sha256(data).hexdigest() != facts.sha256:
            raise RunUnfinished(
                f"input {p.spec.input_display} changed since it was planned; apply again"
            )
        compact = json.dumps(json.loads(data), separators=(",", ":")).encode()
        if len(compact) > self._settings.limits.direct_input_max_bytes:
            raise RunUnfinished(
                f"input {p.spec.input_display} grew past the direct limit; apply again"
            )
        return compact

    async def _upload(self, p: PlannedRun, rec: RunRecord) -> RunRecord:
        spec = p.spec
        size = p.bytes
        async with self._transfer_slots:
            for attempt in range(TRANSFER_ATTEMPTS_MAX):
                if self._no_new:
                    raise RunUnfinished("not started: the batch is stopping")
                # The URL is asked for only now, holding a transfer slot, so it
                # cannot expire while the upload waits its turn.
                ticket = await self._api.upload_url(spec.app)
                issued_at = time.time()
                rec = replace(rec, phase="uploading", upload_id=None, uploaded_at=None)
                self._writer.stage(rec)
                self._phase(p, "uploading", f"{size} bytes")
                try:
                    await self._storage.put_file(
                        ticket.upload_url,
                        spec.input_path,
                        size=size,
                        on_progress=self._progress(p, "mid_upload"),
                    )
                except TransferError as exc:
                    if exc.expired and attempt + 1 < TRANSFER_ATTEMPTS_MAX:
                        self._emit(
                            Event(
                                "warning",
                                run=spec.name,
                                message="upload URL expired; starting over",
                            )
                        )
                        continue
                    raise
                crashpoints.reach("after_upload")
                self._result.bytes_uploaded += size
                rec = replace(
                    rec, phase="uploaded", upload_id=ticket.upload_id, uploaded_at=issued_at
                )
                self._writer.stage(rec)
                self._phase(p, "uploaded")
                return rec
        raise RunUnfinished("upload URLs kept expiring")

    async def _await_final(
        self, p: PlannedRun, rec: RunRecord, poller: Poller
    ) -> tuple[RunRecord, RunState]:
        assert rec.run_id is not None
        self._in_flight[p.spec.name] = rec.run_id
        crashpoints.reach("mid_poll")
        try:
            state = await poller.wait(p.spec.app, rec.run_id, p.spec.timeout_s)
        except TimeoutError:
            with contextlib.suppress(ApiError):
                await self._api.cancel_run(p.spec.app, rec.run_id)
            self._in_flight.pop(p.spec.name, None)
            raise RunFailed(
                f"timed out after {p.spec.timeout_s:g}s; canceled on the service"
            ) from None
        self._in_flight.pop(p.spec.name, None)
        if state.status == "succeeded":
            rec = replace(rec, phase="succeeded", error=None)
            self._writer.stage(rec)
            self._phase(p, "succeeded")
            return rec, state
        if state.status == "canceled":
            raise RunFailed("canceled on the service", phase="canceled")
        raise RunFailed(state.error or "failed on the service (no error message)")

    async def _collect(self, p: PlannedRun, rec: RunRecord, state: RunState | None) -> None:
        spec = p.spec
        assert rec.run_id is not None
        limit = self._settings.limits.download_max_bytes
        async with self._transfer_slots:
            for attempt in range(TRANSFER_ATTEMPTS_MAX):
                if state is None or state.output_url is None:
                    state = await self._api.run_state(spec.app, rec.run_id)
                if state.status != "succeeded" or state.output_url is None:
                    raise RunFailed(f"no output to collect (status {state.status})")
                if state.output_size is not None and state.output_size > limit:
                    raise RunFailed(
                        f"output of {state.output_size} bytes exceeds the download limit of {limit}"
                        " (raise limits.download_max_bytes if your plan allows it)"
                    )
                self._phase(p, "downloading")
                try:
                    size, sha = await self._storage.download(
                        state.output_url,
                        spec.output_path,
                        max_bytes=limit,
                        on_progress=self._progress(p, "mid_download"),
                    )
                except TransferError as exc:
                    if exc.expired and attempt + 1 < TRANSFER_ATTEMPTS_MAX:
                        state = None  # a fresh result brings a fresh link
                        continue
                    raise
                except OSError as exc:
                    raise DiskError(f"cannot write {spec.output_path}: {exc.strerror}") from exc
                break
            else:  # pragma: no cover - the loop always breaks or raises
                raise RunUnfinished("download links kept expiring")
        crashpoints.reach("after_collect")
        self._result.bytes_downloaded += size
        rec = replace(
            rec,
            phase="collected",
            output_path=str(spec.output_path),
            output_sha256=sha,
            output_bytes=size,
            error=None,
        )
        self._writer.stage(rec)
        self._result.outcomes[spec.name] = "collected"
        self._phase(p, "collected", f"{size} bytes")

    # -- bookkeeping --------------------------------------------------------

    def _record_failure(self, p: PlannedRun, rec: RunRecord, exc: RunFailed) -> None:
        rec = replace(rec, phase=exc.phase, error=str(exc))
        self._writer.stage(rec)
        self._result.outcomes[p.spec.name] = "canceled" if exc.phase == "canceled" else "failed"
        self._result.errors[p.spec.name] = str(exc)
        self._phase(p, exc.phase, str(exc))
        if self._settings.fail_fast and not self._no_new:
            self._no_new = True
            self._emit(Event("warning", message="--fail-fast: no new runs will start"))

    def _fail_outcome(self, name: str, message: str) -> None:
        self._result.outcomes[name] = "failed"
        self._result.errors[name] = message
        self._emit(Event("phase", run=name, phase="failed", message=message))

    def _unfinished(self, name: str, message: str) -> None:
        self._result.outcomes[name] = "unfinished"
        self._result.errors[name] = message
        self._emit(Event("warning", run=name, message=message))

    def _phase(self, p: PlannedRun, phase: str, message: str = "") -> None:
        self._emit(Event("phase", run=p.spec.name, phase=phase, message=message))

    def _progress(self, p: PlannedRun, point: str) -> Callable[[int], None]:
        name = p.spec.name
        last = 0

        def report(done: int) -> None:
            # The transfer layer reports bytes done in the current attempt
            # (back to 0 on a retry); events carry deltas.
            nonlocal last
            delta, last = max(done - last, 0), done
            crashpoints.reach(point)
            self._emit(Event("progress", run=name, data={"bytes": delta, "done": done}))

        return report
