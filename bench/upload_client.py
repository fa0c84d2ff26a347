"""One upload, as its own process (so its peak RSS is its own): bench_upload.py runs it.

    python bench/upload_client.py batchrun|httpx URL FILE

batchrun: StorageClient.put_file (the path `apply` takes for a large input).
httpx:    a raw streaming PUT (1 MiB chunks, Content-Length), what a user writes by hand.
Prints {"transfer_s": ...}: the upload alone, from opening the client to the
answer, without the interpreter's start and imports (the process wall time,
which bench_upload.py also takes, includes them).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

CHUNK = 1 << 20


def raw_httpx(url: str, path: Path) -> int:
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    headers = {"Content-Length": str(size), "Content-Type": "application/json"}
    with httpx.Client(timeout=120) as client:
        r = client.put(url, content=chunks(), headers=headers)
    return r.status_code


def with_batchrun(url: str, path: Path) -> int:
    from batchrun.transfer import StorageClient

    async def go() -> None:
        async with StorageClient() as storage:
            await storage.put_file(url, path, size=os.stat(path).st_size)

    asyncio.run(go())
    return 200


def main() -> int:
    mode, url, file = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    start = time.perf_counter()
    status = with_batchrun(url, file) if mode == "batchrun" else raw_httpx(url, file)
    print(json.dumps({"transfer_s": time.perf_counter() - start}))
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
