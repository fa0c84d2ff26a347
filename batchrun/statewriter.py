"""Group commit in front of the state store.

Many runs change phase at once; one fsync per transition would cap a batch at
a few hundred transitions a second. Records staged while a transaction runs
go into the next one, so they share its fsync.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from .model import RunRecord
from .state import StateStore


class StateWriter:
    """Group commit in front of the state store.

    `stage` queues a record; `commit` queues it and waits until it is durable.
    Everything queued while a transaction runs goes into the next one, so many
    runs share one fsync. Writes run on one dedicated thread so SQLite's fsync
    never blocks the event loop.
    """

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchrun-state")
        self._pending: dict[str, RunRecord] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def stage(self, record: RunRecord) -> None:
        if self.error is not None:
            raise self.error
        self._pending[record.name] = replace(record, updated_at=time.time())
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._flush())

    async def commit(self, record: RunRecord) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.stage(record)
        await waiter

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch = list(self._pending.values())
            waiters, self._pending, self._waiters = self._waiters, {}, []
            try:
                await loop.run_in_executor(self._executor, self._store.put_many, batch)
            except BaseException as exc:  # a failed fsync is fatal: nobody may go on
                self.error = exc
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                self._pending.clear()
                return
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    async def drain(self) -> None:
        """Wait until everything staged is written (used at the end, and on interrupt)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)
        if self._pending and self.error is None:
            self._task = asyncio.get_running_loop().create_task(self._flush())
            await asyncio.shield(self._task)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
