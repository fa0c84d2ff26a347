"""The API origin: the Nextmv runs API under /v1/applications/{app_id}, and /_emulator.

All state lives in one asyncio event loop (the emulator's thread); only the
fault knobs are touched from other threads (under the injector's lock).
Shapes follow the official SDK's models (nextmv 1.13.0: nextmv/run.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from batchrun.emulator.apps import App, Outcome
from batchrun.emulator.faults import FaultInjector, SlidingWindowLimiter
from batchrun.emulator.records import (
    REQUEST_TIMES_MAX,
    RunRecord,
    Stats,
    Upload,
    information,
    list_item,
)
from batchrun.emulator.storage import ResetResponse, Signer, TransportMiddleware
from batchrun.errors import UsageError

MAX_RUN_SIZE = 5 * 1024 * 1024  # the SDK's _MAX_RUN_SIZE, compared with ">"
CREATE_BODY_CAP = 64 * 1024 * 1024  # bodies above this are refused unread
PAGE_SIZE = 50
JSON_CHECK_MAX = 64 * 1024 * 1024  # larger outputs are classified by their first byte


class EmulatorState:
    def __init__(
        self,
        *,
        apps: dict[str, App],
        api_key: str | None,
        capacity: int,
        data_dir: Path,
        faults: FaultInjector,
        signer: Signer,
        rate_limits: bool,
        runs_per_second: float,
        results_per_10s: float,
        upload_url_lifetime_s: float,
    ) -> None:
        self.apps = apps
        self.api_key = api_key
        self.capacity = max(1, capacity)
        self.faults = faults
        self.signer = signer
        self.rate_limits = rate_limits
        per_s = max(1, round(runs_per_second))
        self.create_limiter = SlidingWindowLimiter(per_s, per_s / max(runs_per_second, 1e-9))
        self.result_limiter = SlidingWindowLimiter(results_per_10s, 10.0)
        self.upload_url_lifetime_s = upload_url_lifetime_s
        self.dirs = {name: data_dir / name for name in ("uploads", "inputs", "outputs", "work")}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.stats = Stats()
        self.runs: dict[str, RunRecord] = {}
        self.uploads: dict[str, Upload] = {}
        self.seq = 0
        self.running: dict[str, set[str]] = {a: set() for a in apps}
        self.waiting: dict[str, deque[str]] = {a: deque() for a in apps}
        self.concurrent_uploads = 0

    # -- bookkeeping -------------------------------------------------------
    def count_request(self, route: str) -> None:
        r = self.stats.requests_by_route
        r[route] = r.get(route, 0) + 1
        times = self.stats.request_times.setdefault(route, [])
        times.append(time.time())
        if len(times) > REQUEST_TIMES_MAX:
            del times[: len(times) - REQUEST_TIMES_MAX]

    def uploads_started(self) -> None:
        self.concurrent_uploads += 1
        self.stats.peak_concurrent_uploads = max(
            self.stats.peak_concurrent_uploads, self.concurrent_uploads
        )

    def uploads_finished(self) -> None:
        self.concurrent_uploads -= 1

    def upload_path(self, upload_id: str) -> Path:
        return self.dirs["uploads"] / upload_id

    def upload_done(self, upload_id: str, size: int) -> None:
        upload = self.uploads.get(upload_id)
        if upload is not None:
            upload.size = size

    def output_path(self, run_id: str) -> Path:
        return self.dirs["outputs"] / run_id

    def stats_json(self) -> dict[str, Any]:
        s = self.stats
        by_status: dict[str, int] = {}
        for r in self.runs.values():
            by_status[r.status] = by_status.get(r.status, 0) + 1
        return {
            "runs_created": s.runs_created,
            "runs_created_by_name": dict(s.runs_created_by_name),
            "runs_created_by_description": dict(s.runs_created_by_description),
            "requests_by_route": dict(s.requests_by_route),
            "peak_running": s.peak_running,
            "running": sum(len(v) for v in self.running.values()),
            "queued": sum(len(v) for v in self.waiting.values()),
            "runs_by_status": by_status,
            "peak_concurrent_uploads": s.peak_concurrent_uploads,
            "bytes_uploaded": s.bytes_uploaded,
            "bytes_downloaded": s.bytes_downloaded,
            "storage_auth_headers": s.storage_auth_headers,
            "api_auth_failures": s.api_auth_failures,
            "faults_injected": dict(self.faults.injected),
            "responses_429": s.responses_429,
            "uploads_aborted": s.uploads_aborted,
            "request_times": {k: list(v) for k, v in s.request_times.items()},
        }

    def reset_stats(self) -> None:
        self.stats = Stats()
        self.faults.reset_counts()

    # -- scheduling --------------------------------------------------------
    def submit(self, run: RunRecord) -> None:
        if len(self.running[run.app_id]) < self.capacity:
            self._start(run)
        else:
            self.waiting[run.app_id].append(run.id)

    def _start(self, run: RunRecord) -> None:
        run.status = "running"
        run.started_at = time.time()
        self.running[run.app_id].add(run.id)
        total = sum(len(v) for v in self.running.values())
        self.stats.peak_running = max(self.stats.peak_running, total)
        run.task = asyncio.get_running_loop().create_task(self._execute(run))

    def _release(self, run: RunRecord) -> None:
        self.running[run.app_id].discard(run.id)
        queue = self.waiting[run.app_id]
        while queue and len(self.running[run.app_id]) < self.capacity:
            nxt = self.runs.get(queue.popleft())
            if nxt is not None and nxt.status == "queued":
                self._start(nxt)

    async def _execute(self, run: RunRecord) -> None:
        work = self.dirs["work"]
        try:
            if run.inject_failure:
                outcome = Outcome(False, "injected failure: the run failed (emulator fault)")
            else:
                app = self.apps[run.app_id]
                outcome = await app.run(run.input_path, dict(run.options), run.output_path, work)
            if outcome.ok:
                await asyncio.to_thread(self._classify_output, run)
                run.status = "succeeded"
            else:
                run.status = "failed"
                run.error = outcome.error or "run failed"
                run.stderr = outcome.stderr
                run.output_path.unlink(missing_ok=True)
        except asyncio.CancelledError:
            run.status = "canceled"
            run.output_path.unlink(missing_ok=True)
        except Exception as exc:  # a bug or an OS error: the run fails, the server lives
            run.status = "failed"
            run.error = f"emulator error: {exc}"
        finally:
            run.ended_at = time.time()
            self._release(run)

    @staticmethod
    def _classify_output(run: RunRecord) -> None:
        path = run.output_path
        if not path.exists():
            path.write_bytes(b"")
        run.output_size = path.stat().st_size
        if run.output_size <= JSON_CHECK_MAX:
            try:
                data = json.loads(path.read_bytes())
            except (ValueError, UnicodeDecodeError):
                run.output_type = "text"
                return
            run.output_type = "json"
            if run.output_size <= MAX_RUN_SIZE and isinstance(data, dict):
                stats = data.get("statistics")
                if isinstance(stats, dict):
                    run.statistics = stats
            return
        with path.open("rb") as f:
            first = f.read(64).lstrip()[:1]
        run.output_type = "json" if first in (b"{", b"[") else "text"

    def cancel(self, run: RunRecord) -> None:
        if run.status == "queued":
            run.status = "canceled"
            run.ended_at = time.time()
            with contextlib.suppress(ValueError):
                self.waiting[run.app_id].remove(run.id)
        elif run.status == "running" and run.task is not None:
            run.task.cancel()

    async def shutdown(self) -> None:
        tasks = [r.task for r in self.runs.values() if r.task is not None and not r.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


Handler = Callable[[Request, str], Awaitable[Response]]


def build_api_app(state: EmulatorState) -> ASGIApp:
    def api(route: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            state.count_request(route)
            if state.api_key is not None:
                auth = request.headers.get("authorization", "")
                if not secrets.compare_digest(auth.encode(), f"Bearer {state.api_key}".encode()):
                    state.stats.api_auth_failures += 1
                    return error(401, "unauthorized: a valid API key is required")
            latency = state.faults.latency()
            if latency > 0:
                await asyncio.sleep(latency)
            decision = state.faults.decide(route)
            if decision.kind == "reset":
                return ResetResponse()
            if decision.kind == "429":
                state.stats.responses_429 += 1
                return error(429, "too many requests (injected)", decision.headers)
            if decision.kind == "error":
                return error(decision.status, "injected server error", decision.headers)
            if state.rate_limits:
                limiter = None
                if route == "create":
                    limiter = state.create_limiter
                elif route in ("result", "metadata", "output"):
                    limiter = state.result_limiter
                wait = limiter.acquire() if limiter is not None else 0.0
                if wait > 0:
                    state.stats.responses_429 += 1
                    return error(429, "rate limit exceeded", state.faults.retry_after(wait))
            app_id = request.path_params["app_id"]
            if app_id not in state.apps:
                return error(404, f"application {app_id} not found")
            return await handler(request, app_id)

        return endpoint

    def find_run(request: Request, app_id: str) -> RunRecord | None:
        run = state.runs.get(request.path_params["run_id"])
        return run if run is not None and run.app_id == app_id else None

    async def upload_url(request: Request, app_id: str) -> Response:
        upload_id = str(uuid.uuid4())
        state.uploads[upload_id] = Upload(app_id, state.upload_path(upload_id))
        lifetime = state.faults.upload_lifetime(state.upload_url_lifetime_s)
        url = state.signer.sign("PUT", f"/uploads/{upload_id}", lifetime)
        return JSONResponse({"upload_id": upload_id, "upload_url": url})

    async def create(request: Request, app_id: str) -> Response:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > CREATE_BODY_CAP:
            return error(
                413,
                f"request body too large; inputs above {MAX_RUN_SIZE} bytes "
                "must be uploaded (POST /runs/uploadurl)",
            )
        try:
            body = json.loads(await request.body())
        except ClientDisconnect:
            return Response(b"", status_code=400)  # nobody left to answer
        except ValueError:
            return error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "request body must be a JSON object")
        problem = _check_create(body)
        if problem:
            return error(400, problem)
        instance_id = request.query_params.get("instance_id") or "latest"
        if not _SAFE_ID.fullmatch(instance_id):
            return error(400, f"invalid instance_id {instance_id!r}")
        run_id = f"{instance_id}-{secrets.token_urlsafe(7)[:9]}"
        configuration = body.get("configuration") or {}
        fmt = _input_type(configuration)
        if "input" in body:
            raw = body["input"]
            data = raw if isinstance(raw, str) else json.dumps(raw, separators=(",", ":"))
            encoded = data.encode()
            if len(encoded) > MAX_RUN_SIZE:
                return error(
                    413,
                    f"input is {len(encoded)} bytes, above the {MAX_RUN_SIZE}-byte "
                    "limit for inline input: upload it (POST /runs/uploadurl)",
                )
            input_path = state.dirs["inputs"] / run_id
            input_path.write_bytes(encoded)
            input_size = len(encoded)
            if isinstance(raw, str) and fmt == "json":
                fmt = "text"
        else:
            upload = state.uploads.get(str(body["upload_id"]))
            if upload is None or upload.app_id != app_id:
                return error(400, f"unknown upload_id {body['upload_id']}")
            if upload.size is None:
                return error(400, f"upload {body['upload_id']} has no data: PUT the input first")
            input_path, input_size = upload.path, upload.size
        name = body.get("name") or ""
        description = body.get("description") or ""
        state.seq += 1
        run = RunRecord(
            id=run_id,
            seq=state.seq,
            app_id=app_id,
            instance_id=instance_id,
            name=name,
            description=description,
            options=dict(body.get("options") or {}),
            configuration=configuration,
            input_path=input_path,
            input_size=input_size,
            input_type=str(fmt),
            output_path=state.output_path(run_id),
            created_at=time.time(),
            inject_failure=state.faults.run_failure(),
        )
        state.runs[run_id] = run
        s = state.stats
        s.runs_created += 1
        s.runs_created_by_name[name] = s.runs_created_by_name.get(name, 0) + 1
        s.runs_created_by_description[description] = (
            s.runs_created_by_description.get(description, 0) + 1
        )
        state.submit(run)
        lost = state.faults.lose_create()
        if lost == "reset":
            return ResetResponse()
        if lost == "502":
            return error(502, "bad gateway")
        return JSONResponse({"run_id": run_id})

    async def metadata(request: Request, app_id: str) -> Response:
        run = find_run(request, app_id)
        if run is None:
            return error(404, f"run {request.path_params['run_id']} not found")
        return JSONResponse(information(run))

    def output_url(run: RunRecord) -> str:
        return state.signer.sign("GET", f"/outputs/{run.id}", state.upload_url_lifetime_s)

    def inline_refusal(run: RunRecord) -> Response | None:
        if run.output_type != "json":
            return error(
                400, f"the output format is {run.output_type}: request it with ?format=url"
            )
        if run.output_size > MAX_RUN_SIZE:
            return error(
                400,
                f"the output is {run.output_size} bytes, above the "
                f"{MAX_RUN_SIZE}-byte limit for inline output: request it with ?format=url",
            )
        return None

    async def result(request: Request, app_id: str) -> Response:
        run = find_run(request, app_id)
        if run is None:
            return error(404, f"run {request.path_params['run_id']} not found")
        info = information(run)
        if run.status == "failed":
            info["error_log"] = {"error": run.error, "stdout": "", "stderr": run.stderr}
        if run.status != "succeeded":
            return JSONResponse(info)
        if request.query_params.get("format") == "url":
            info["output"] = {"url": output_url(run)}
            return JSONResponse(info)
        refusal = inline_refusal(run)
        if refusal is not None:
            return refusal
        # Splice the stored output in as is: it is valid JSON and at most 5 MiB.
        head = json.dumps(info, separators=(",", ":"))[:-1].encode()
        body = head + b',"output":' + run.output_path.read_bytes() + b"}"
        return Response(body, media_type="application/json")

    async def output(request: Request, app_id: str) -> Response:
        run = find_run(request, app_id)
        if run is None:
            return error(404, f"run {request.path_params['run_id']} not found")
        if run.status != "succeeded":
            return error(404, f"run {run.id} has no output (status {run.status})")
        if request.query_params.get("format") == "url":
            return JSONResponse({"url": output_url(run)})
        refusal = inline_refusal(run)
        if refusal is not None:
            return refusal
        return Response(run.output_path.read_bytes(), media_type="application/json")

    async def list_runs(request: Request, app_id: str) -> Response:
        token = request.query_params.get("pagetoken")
        before = None
        if token:
            try:
                before = int(token)
            except ValueError:
                return error(400, "invalid pagetoken")
        runs = sorted(
            (
                r
                for r in state.runs.values()
                if r.app_id == app_id and (before is None or r.seq < before)
            ),
            key=lambda r: r.seq,
            reverse=True,
        )
        page = runs[:PAGE_SIZE]
        body: dict[str, Any] = {"runs": [list_item(r) for r in page]}
        if len(runs) > PAGE_SIZE:
            body["next_page_token"] = str(page[-1].seq)
        return JSONResponse(body)

    async def cancel(request: Request, app_id: str) -> Response:
        run = find_run(request, app_id)
        if run is None:
            return error(404, f"run {request.path_params['run_id']} not found")
        state.cancel(run)
        return JSONResponse({})

    async def get_stats(request: Request) -> Response:
        return JSONResponse(state.stats_json())

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            try:
                knobs = json.loads(await request.body() or b"{}")
                if not isinstance(knobs, dict):
                    raise ValueError("expected a JSON object of knobs")
                state.faults.update(**knobs)
            except (ValueError, TypeError, UsageError) as exc:
                return error(400, str(exc))
        return JSONResponse(state.faults.snapshot())

    async def reset_stats(request: Request) -> Response:
        state.reset_stats()
        return JSONResponse(state.stats_json())

    base = "/v1/applications/{app_id}"
    routes = [
        Route(f"{base}/runs/uploadurl", api("uploadurl", upload_url), methods=["POST"]),
        Route(f"{base}/runs", api("create", create), methods=["POST"]),
        Route(f"{base}/runs", api("list", list_runs), methods=["GET"]),
        Route(f"{base}/runs/{{run_id}}/metadata", api("metadata", metadata), methods=["GET"]),
        Route(f"{base}/runs/{{run_id}}/output", api("output", output), methods=["GET"]),
        Route(f"{base}/runs/{{run_id}}/cancel", api("cancel", cancel), methods=["PATCH"]),
        Route(f"{base}/runs/{{run_id}}", api("result", result), methods=["GET"]),
        Route("/_emulator/stats", get_stats, methods=["GET"]),
        Route("/_emulator/faults", faults, methods=["GET", "POST"]),
        Route("/_emulator/reset-stats", reset_stats, methods=["POST"]),
    ]
    return TransportMiddleware(Starlette(routes=routes))


_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _input_type(configuration: dict[str, Any]) -> str:
    fmt = configuration.get("format")
    inp = fmt.get("input") if isinstance(fmt, dict) else None
    kind = inp.get("type") if isinstance(inp, dict) else None
    return kind if isinstance(kind, str) and kind else "json"


def _check_create(body: dict[str, Any]) -> str:
    """The create-run body's problems ('' when fine)."""
    if "input_id" in body:
        return "input_id (managed inputs) is not supported by the emulator"
    has_input = "input" in body and body["input"] is not None
    has_upload = body.get("upload_id") is not None
    if has_input == has_upload:
        return "exactly one of input and upload_id is required"
    if not has_input:
        body.pop("input", None)
    options = body.get("options")
    if options is not None and (
        not isinstance(options, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items())
    ):
        return "options must be an object of string to string"
    for key in ("name", "description"):
        if body.get(key) is not None and not isinstance(body[key], str):
            return f"{key} must be a string"
    configuration = body.get("configuration")
    if configuration is not None and not isinstance(configuration, dict):
        return "configuration must be an object"
    return ""
