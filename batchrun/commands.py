"""What each command does, as plain Python: `batchrun.apply(...)` without the CLI.

This module wires the stages together (manifest → plan → engine) and owns the
lifetime of what they share: the state lock and store, the hash cache, the API
and storage clients, the embedded emulator. It never prints; progress goes to
an event sink and results are returned.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ApiError, UsageError
from .events import Event, Sink, discard
from .manifest import load_manifest
from .model import EMBEDDED_ENDPOINT, FileFacts, Manifest, Plan, RunRecord
from .outcome import ApplyResult, nothing_to_do
from .plan import HashCache, default_cache_path, gather_facts, make_plan, output_facts
from .state import StateLock, StateStore, default_state_path, manifest_identity

if TYPE_CHECKING:
    # The HTTP stack (httpx) costs ~0.1 s to import: validate, plan, status and
    # an apply with nothing to do never load it (nor the engine, nor asyncio).
    from .client import ApiClient
    from .transfer import StorageClient


@dataclass(frozen=True)
class Overrides:
    """Command-line settings that win over the manifest's."""

    state_path: Path | None = None
    endpoint: str | None = None
    concurrency: int | None = None
    transfers: int | None = None
    runs_per_second: float | None = None
    results_per_10s: float | None = None
    output_root: Path | None = None


@dataclass(frozen=True)
class Planned:
    manifest: Manifest
    plan: Plan
    facts: dict[Path, FileFacts]
    records: dict[str, RunRecord]
    state_path: Path


def validate(manifest_path: Path, overrides: Overrides = Overrides()) -> Manifest:
    """Load and check a manifest; raises ManifestError with every problem."""
    manifest = load_manifest(manifest_path, output_root=overrides.output_root)
    return _with_overrides(manifest, overrides)


def _with_overrides(manifest: Manifest, o: Overrides) -> Manifest:
    limits = manifest.limits
    if o.runs_per_second is not None:
        limits = replace(limits, runs_per_second=o.runs_per_second)
    if o.results_per_10s is not None:
        limits = replace(limits, results_per_10s=o.results_per_10s)
    return replace(
        manifest,
        endpoint=o.endpoint or manifest.endpoint,
        concurrency=o.concurrency or manifest.concurrency,
        transfers=o.transfers or manifest.transfers,
        limits=limits,
    )


def state_path_for(manifest: Manifest, overrides: Overrides) -> Path:
    return overrides.state_path or default_state_path(manifest.path)


def plan_manifest(
    manifest: Manifest, overrides: Overrides, store: StateStore | None = None
) -> Planned:
    """The plan against the state file (read-only unless the caller holds the store)."""
    state_path = state_path_for(manifest, overrides)
    identity = manifest_identity(manifest.path)
    records = store.records() if store else StateStore.read_only(state_path, identity)
    cache = HashCache.load(default_cache_path(manifest.path))
    try:
        facts = gather_facts(manifest.runs, cache, manifest.limits)
    except OSError as exc:  # an input vanished between validation and planning
        raise UsageError(
            f"cannot read input {exc.filename}: {exc.strerror or exc} (check it and run again)"
        ) from exc
    outputs = output_facts(records, cache)
    plan = make_plan(manifest.runs, facts, records, outputs, manifest.limits)
    with contextlib.suppress(OSError):  # the cache only saves time; never fail a plan over it
        cache.save()
    return Planned(manifest, plan, facts, records, state_path)


def plan(manifest_path: Path, overrides: Overrides = Overrides()) -> Planned:
    return plan_manifest(validate(manifest_path, overrides), overrides)


def resolve_api_key(manifest: Manifest) -> str:
    key = os.environ.get(manifest.api_key_env, "").strip()
    if not key:
        raise UsageError(
            f"{manifest.api_key_env} is not set: export your Nextmv API key in it"
            " (or use `endpoint: embedded` to try the manifest offline)"
        )
    return key


@contextlib.contextmanager
def service(manifest: Manifest, emit: Sink) -> Iterator[tuple[str, str]]:
    """(base URL, API key) of the service the manifest names; starts the embedded emulator."""
    if manifest.endpoint != EMBEDDED_ENDPOINT:
        yield manifest.endpoint, resolve_api_key(manifest)
        return
    from .emulator import EmulatorConfig, start_emulator

    apps = manifest.embedded.apps
    if not apps:
        app_ids = sorted({spec.app for spec in manifest.runs})
        apps = tuple((app, "builtin:echo") for app in app_ids)
        emit(
            Event(
                "warning",
                message="embedded.apps not set: serving "
                + ", ".join(app_ids)
                + " with the built-in echo app",
            )
        )
    # A random key keeps the embedded path identical to the real one.
    key = secrets.token_urlsafe(24)
    emulator = start_emulator(
        EmulatorConfig(api_key=key, apps=apps, capacity=manifest.embedded.capacity)
    )
    try:
        yield emulator.api_url, key
    finally:
        emulator.stop()


@contextlib.asynccontextmanager
async def clients(
    base_url: str, api_key: str, manifest: Manifest
) -> AsyncIterator[tuple[ApiClient, StorageClient]]:
    from .client import ApiClient
    from .transfer import StorageClient

    api = ApiClient(
        base_url,
        api_key,
        limits=manifest.limits,
        max_connections=max(16, manifest.concurrency * 2),
        requests_per_minute=manifest.limits.requests_per_minute,
    )
    storage = StorageClient(max_connections=max(4, manifest.transfers * 2))
    try:
        yield api, storage
    finally:
        await api.aclose()
        await storage.aclose()


@contextlib.contextmanager
def locked_plan(manifest: Manifest, overrides: Overrides) -> Iterator[tuple[Planned, StateStore]]:
    """The plan against the state, with the state lock held and the store open."""
    state_path = state_path_for(manifest, overrides)
    lock = StateLock(state_path, manifest=manifest.path)
    lock.acquire()
    try:
        store = StateStore.open(state_path, manifest_identity(manifest.path), create=True)
        try:
            yield plan_manifest(manifest, overrides, store), store
        finally:
            store.close()
    finally:
        lock.release()


async def execute(
    planned: Planned,
    store: StateStore,
    *,
    fail_fast: bool = False,
    emit: Sink = discard,
    on_engine: Any = None,
    seed: int | None = None,
) -> ApplyResult:
    """Run a plan made under `locked_plan`. `on_engine(engine)` lets a caller wire signals."""
    from .engine import Engine, EngineSettings

    if not planned.plan.summary.pending:
        # No emulator to start, no API key needed, no request made.
        return nothing_to_do(planned.plan, emit)
    manifest = planned.manifest
    settings = EngineSettings(
        concurrency=manifest.concurrency,
        transfers=manifest.transfers,
        limits=manifest.limits,
        fail_fast=fail_fast,
        seed=seed,
    )
    with service(manifest, emit) as (url, key):
        async with clients(url, key, manifest) as (api, storage):
            engine = Engine(planned.plan, planned.facts, store, api, storage, settings, emit)
            if on_engine is not None:
                on_engine(engine)
            return await engine.run()


async def apply_async(
    manifest: Manifest,
    overrides: Overrides = Overrides(),
    *,
    fail_fast: bool = False,
    emit: Sink = discard,
    on_engine: Any = None,
    seed: int | None = None,
) -> ApplyResult:
    """Apply under the state lock. `on_engine(engine)` lets a caller wire signals."""
    with locked_plan(manifest, overrides) as (planned, store):
        return await execute(
            planned, store, fail_fast=fail_fast, emit=emit, on_engine=on_engine, seed=seed
        )


def apply(
    manifest_path: Path | str,
    overrides: Overrides = Overrides(),
    *,
    fail_fast: bool = False,
    emit: Sink = discard,
) -> ApplyResult:
    """`batchrun apply` from Python."""
    import asyncio

    manifest = validate(Path(manifest_path), overrides)
    return asyncio.run(apply_async(manifest, overrides, fail_fast=fail_fast, emit=emit))


def status(
    manifest_path: Path, overrides: Overrides = Overrides()
) -> tuple[Manifest, dict[str, RunRecord]]:
    manifest = validate(manifest_path, overrides)
    path = state_path_for(manifest, overrides)
    return manifest, StateStore.read_only(path, manifest_identity(manifest.path))


async def cancel_async(
    manifest: Manifest, overrides: Overrides, emit: Sink
) -> list[tuple[str, str]]:
    """Cancel every run the state says is on the service; returns (name, run id) canceled."""
    state_path = state_path_for(manifest, overrides)
    lock = StateLock(state_path, manifest=manifest.path)
    lock.acquire()
    canceled: list[tuple[str, str]] = []
    try:
        store = StateStore.open(state_path, manifest_identity(manifest.path), create=False)
        try:
            live = [
                r
                for r in store.records().values()
                if r.run_id and r.phase in ("submitting", "submitted")
            ]
            if not live:
                return canceled
            apps = {s.name: s.app for s in manifest.runs}
            with service(manifest, emit) as (url, key):
                async with clients(url, key, manifest) as (api, _storage):
                    for rec in live:
                        assert rec.run_id is not None
                        try:
                            await api.cancel_run(apps.get(rec.name, ""), rec.run_id)
                        except ApiError as exc:
                            emit(Event("warning", run=rec.name, message=f"cancel failed: {exc}"))
                            continue
                        store.put(
                            replace(rec, phase="canceled", error="canceled by batchrun cancel")
                        )
                        canceled.append((rec.name, rec.run_id))
        finally:
            store.close()
    finally:
        lock.release()
    return canceled
