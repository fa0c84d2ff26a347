"""Benchmark 1 (issue 6): a 400 MB upload, batchrun vs a raw httpx PUT vs curl.

Each upload is its own process against the emulator's storage origin (a
fresh presigned URL each time): batchrun's StorageClient.put_file, a raw
httpx streaming PUT, and `curl --data-binary @file` (the documented method).
Also, for information, `batchrun apply` of a one-run manifest with that input
(plan hash + upload + run + download). The emulator's copy is checked (size
and sha256) after every upload.
Two times per upload: the transfer (from opening the client to the answer, as
the client process reports it; curl's own time_total) and the process wall
time (interpreter start and imports included: batchrun's path imports asyncio,
the raw httpx script does not, ~40 ms here).
Targets: batchrun's transfer within 1.1x of the raw httpx PUT's; peak RSS < 100 MB.

    python bench/bench_upload.py [--quick] [--reps N] [--mb N]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from _common import (
    API_KEY,
    PY,
    BenchError,
    Figure,
    Measured,
    batchrun,
    batchrun_env,
    check_apply,
    emulator,
    print_table,
    run_main,
    run_measured,
    save_results,
    verdict,
    write_manifest,
)
from _common import bench_args as make_args

HERE = Path(__file__).resolve().parent
METHODS = ("batchrun", "httpx", "curl")


def make_file(path: Path, mb: int) -> str:
    """A JSON document of `mb` MB; returns its sha256."""
    sha = hashlib.sha256()
    block = (b'"' + b"x" * 998 + b'",') * 1024  # ~1 MB of array items
    with path.open("wb") as f:
        head = b'{"items":['
        f.write(head)
        sha.update(head)
        for _ in range(mb - 1):
            f.write(block)
            sha.update(block)
        tail = b'"end"]}'
        f.write(tail)
        sha.update(tail)
    return sha.hexdigest()


def sha_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def one_upload(emu: Any, data_dir: Path, method: str, file: Path, sha: str) -> Measured:
    r = httpx.post(
        f"{emu.api_url}/v1/applications/echo/runs/uploadurl",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    r.raise_for_status()
    upload_id, url = r.json()["upload_id"], r.json()["upload_url"]
    if method == "curl":
        argv = ["curl", "-sS", "-f", "-X", "PUT", "--data-binary", f"@{file}"]
        argv += ["-H", "Content-Type: application/json", "-w", '{"transfer_s": %{time_total}}']
        m = run_measured([*argv, url])
    else:
        m = run_measured(
            [PY, str(HERE / "upload_client.py"), method, url, str(file)], env=batchrun_env()
        )
    if m.rc != 0:
        raise BenchError(f"{method} upload exited {m.rc}: {m.stderr[-1000:]}")
    stored = data_dir / "uploads" / upload_id
    if not stored.exists() or stored.stat().st_size != file.stat().st_size:
        raise BenchError(f"{method}: the emulator holds no complete copy of the upload")
    if sha_of(stored) != sha:
        raise BenchError(f"{method}: the uploaded copy differs from the file")
    stored.unlink()
    return m


def transfer_s(m: Measured) -> float:
    lines = [x for x in m.stdout.strip().splitlines() if x.startswith("{")]
    if not lines:
        raise BenchError(f"no transfer time in the client's output: {m.stdout[-300:]!r}")
    return float(json.loads(lines[-1])["transfer_s"])


def main() -> int:
    ap = make_args(__doc__)
    ap.add_argument("--mb", type=int, default=None)
    args = ap.parse_args()
    mb = args.mb or (50 if args.quick else 400)
    reps = args.reps or (1 if args.quick else 3)
    if shutil.which("curl") is None:
        raise BenchError("curl is not installed")
    wall = {m: Figure() for m in (*METHODS, "apply")}
    transfer = {m: Figure() for m in METHODS}
    rss = {m: Figure() for m in (*METHODS, "apply")}
    ratio = Figure()  # transfer time, batchrun / httpx (the target)
    ratio_wall = Figure()  # process wall time, batchrun / httpx
    with tempfile.TemporaryDirectory(prefix="bench-upload-", dir=os.environ.get("BENCH_TMP")) as t:
        root = Path(t)
        file = root / "in" / "big.json"
        file.parent.mkdir()
        sha = make_file(file, mb)
        data_dir = root / "emu"
        with emulator(data_dir, capacity=4) as emu:
            for rep in range(reps):
                order = METHODS if rep % 2 == 0 else tuple(reversed(METHODS))
                got: dict[str, Measured] = {}
                for method in order:
                    got[method] = one_upload(emu, data_dir, method, file, sha)
                    wall[method].add(got[method].wall_s)
                    transfer[method].add(transfer_s(got[method]))
                    rss[method].add(got[method].maxrss_mb)
                ratio.add(transfer_s(got["batchrun"]) / transfer_s(got["httpx"]))
                ratio_wall.add(got["batchrun"].wall_s / got["httpx"].wall_s)
                print(
                    f"rep {rep + 1}/{reps}: "
                    + ", ".join(f"{k} {v.wall_s:.2f}s {v.maxrss_mb:.0f}MB" for k, v in got.items()),
                    file=sys.stderr,
                )
            # The whole apply path once per rep: plan hash, upload, run, download.
            for rep in range(reps):
                manifest = write_manifest(
                    root / f"upload-{rep}.yaml",
                    endpoint=emu.api_url,
                    concurrency=1,
                    input_glob="in/big.json",
                    output=f"out-{rep}/{{name}}.json",
                    limits={"download_max_bytes": 10_000_000},
                )
                m = batchrun("apply", manifest, "--json", cwd=root)
                summary = check_apply(m, 1)
                if summary.get("bytes_uploaded") != file.stat().st_size:
                    raise BenchError(f"apply uploaded {summary.get('bytes_uploaded')} bytes")
                wall["apply"].add(m.wall_s)
                rss["apply"].add(m.maxrss_mb)
                shutil.rmtree(data_dir / "uploads", ignore_errors=True)
                (data_dir / "uploads").mkdir()
    rows = []
    labels = {
        "batchrun": "batchrun StorageClient.put_file",
        "httpx": "raw httpx streaming PUT",
        "curl": "curl --data-binary @file",
        "apply": "batchrun apply (hash+upload+run+download)",
    }
    for m in (*METHODS, "apply"):
        t = transfer.get(m)
        rows.append(
            [
                labels[m],
                t.fmt(2) if t else "-",
                f"{mb / (t or wall[m]).median:.0f}",
                wall[m].fmt(2),
                rss[m].fmt(0),
            ]
        )
    print_table(
        f"Upload of a {mb} MB input, {reps} reps (median [min–max])",
        ["client", "transfer s", "MB/s", "process wall s", "peak RSS MB"],
        rows,
    )
    ratio_ok = ratio.median <= 1.1
    rss_ok = rss["batchrun"].hi < 100 and rss["apply"].hi < 100
    print(f"\nbatchrun / httpx transfer: {ratio.fmt(2)}x (target <= 1.1x): {verdict(ratio_ok)}")
    print(f"batchrun / httpx process wall (startup included): {ratio_wall.fmt(2)}x")
    print(
        f"batchrun peak RSS: {rss['batchrun'].hi:.0f} MB, apply {rss['apply'].hi:.0f} MB "
        f"(target < 100 MB): {verdict(rss_ok)}"
    )
    save_results(
        args.results,
        "upload",
        {
            "mb": mb,
            "reps": reps,
            "wall": {k: v.to_json() for k, v in wall.items()},
            "transfer": {k: v.to_json() for k, v in transfer.items()},
            "rss": {k: v.to_json() for k, v in rss.items()},
            "ratio": ratio.to_json(),
            "ratio_wall": ratio_wall.to_json(),
            "ratio_ok": ratio_ok,
            "rss_ok": rss_ok,
        },
    )
    return 0


if __name__ == "__main__":
    run_main(main)
