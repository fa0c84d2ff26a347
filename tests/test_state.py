"""The state store and its lock, on real files and real processes.

Rows of reliability.md covered: 2 (kill during writes), 10 (lock), 11 (refusals),
13 (disk full), 16 (0600), 17 (symlinks).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchrun.errors import LockHeldError, StateError
from batchrun.model import RunRecord
from batchrun.state import (
    STATE_SCHEMA_VERSION,
    StateLock,
    StateStore,
    default_state_path,
    force_unlock,
    manifest_identity,
)

ID = "m.yaml"


def full_record(name: str = "a", **kw: object) -> RunRecord:
    values: dict[str, object] = {
        "name": name,
        "fingerprint": "sha256:" + "ab" * 32,
        "phase": "collected",
        "key": "br-0123456789abcdef",
        "attempt": 3,
        "upload_id": "upl-42",
        "uploaded_at": 1764331200.123456,
        "run_id": "run-7",
        "output_path": "/out/a é.json",
        "output_sha256": "cd" * 32,
        "output_bytes": 2**40 + 1,
        "error": "line1\nline2 ‘quoted’",
        "history": ("run-5", "run-6"),
        "updated_at": 1764331299.987654,
    }
    values.update(kw)
    return RunRecord(**values)  # type: ignore[arg-type]


def files_of(path: Path) -> dict[str, bytes]:
    """Bytes of the state file and its companions (read only while no store is open)."""
    return {p.name: p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name)}


def make_store(path: Path, identity: str = ID, records: int = 3, payload: int = 10) -> None:
    with StateStore.open(path, identity) as s:
        s.put_many(full_record(f"r{i}", error="x" * payload) for i in range(records))


def run_py(code: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-P", "-c", code, *args], stdout=subprocess.PIPE, text=True, **kw
    )


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# ------------------------------------------------------------------ basics


def test_paths_and_identity(tmp_path: Path) -> None:
    m = tmp_path / "nightly.yaml"
    assert default_state_path(m) == tmp_path / "nightly.batchrun-state.db"
    assert manifest_identity(m) == "nightly.yaml"
    assert manifest_identity(Path("/elsewhere/clone-2/nightly.yaml")) == "nightly.yaml"


def test_round_trip_every_field(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rec = full_record()
    minimal = RunRecord(name="b", fingerprint="f", phase="planned", updated_at=5.0)
    with StateStore.open(path, ID) as s:
        assert s.schema_version == STATE_SCHEMA_VERSION and s.identity == ID
        assert len(s.lineage) == 36
        s.put(rec)
        s.put(minimal)
        assert s.get("a") == rec and s.get("b") == minimal and s.get("zz") is None
    assert StateStore.read_only(path, ID) == {"a": rec, "b": minimal}
    with StateStore.open(path, ID, create=False) as s:
        assert s.records() == {"a": rec, "b": minimal}


def test_updated_at_zero_means_now(tmp_path: Path) -> None:
    with StateStore.open(tmp_path / "s.db", ID) as s:
        before = time.time()
        s.put(RunRecord(name="a", fingerprint="f", phase="planned"))
        got = s.get("a")
        assert got is not None and before <= got.updated_at <= time.time()


def test_history_accumulates(tmp_path: Path) -> None:
    with StateStore.open(tmp_path / "s.db", ID) as s:
        base = RunRecord(name="a", fingerprint="f1", phase="submitted", run_id="r1")
        s.put(base)
        s.put(base)  # same run id: nothing added
        s.put(RunRecord(name="a", fingerprint="f2", phase="planned"))  # new fingerprint
        s.put(RunRecord(name="a", fingerprint="f2", phase="submitted", run_id="r2"))
        s.put(RunRecord(name="a", fingerprint="f3", phase="submitted", run_id="r3"))
        got = s.get("a")
        assert got is not None and got.history == ("r1", "r2") and got.run_id == "r3"
        # A caller that carries history itself gets no duplicates.
        s.put(RunRecord(name="a", fingerprint="f4", phase="submitted", run_id="r4",
                        history=("r1", "r2", "r3")))  # fmt: skip
        got = s.get("a")
        assert got is not None and got.history == ("r1", "r2", "r3")


def test_put_many_is_one_transaction(tmp_path: Path) -> None:
    with StateStore.open(tmp_path / "s.db", ID) as s:
        good = full_record("a")
        bad = full_record("b", phase="nonsense")
        with pytest.raises(ValueError):
            s.put_many([good, bad])
        assert s.records() == {}
        s.put_many([good, full_record("b")])
        assert set(s.records()) == {"a", "b"}


@pytest.mark.parametrize(
    "field,value",
    [
        ("error", "GET https://s3/x?X-Amz-Signature=abc failed"),
        ("output_path", "https://blob/x?sv=1&sig=abc"),
        ("error", "Authorization: Bearer nx_live_123"),
        ("history", ("https://b/x?Signature=zz",)),
        ("key", "k-TOPSECRETAPIKEY"),
    ],
)
def test_secrets_refused(tmp_path: Path, field: str, value: object) -> None:
    with StateStore.open(tmp_path / "s.db", ID, secrets=["TOPSECRETAPIKEY"]) as s:
        with pytest.raises(ValueError) as info:
            s.put(full_record(**{field: value}))
        assert "secret" in str(info.value) and "abc" not in str(info.value)
        assert s.records() == {}
        s.put(full_record(error="the bearer token is missing"))  # an ordinary word


def test_read_only_missing_and_create_false(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    assert StateStore.read_only(path, ID) == {}
    with pytest.raises(StateError, match="does not exist"):
        StateStore.open(path, ID, create=False)
    assert list(tmp_path.iterdir()) == []


def test_read_only_sees_commits_of_open_store(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with StateStore.open(path, ID) as s:
        s.put(full_record("a"))
        assert StateStore.read_only(path, ID) == {"a": full_record("a")}


# ------------------------------------------------------------------ modes, symlinks


def test_files_are_0600_under_umask_022(tmp_path: Path, umask022: None) -> None:
    path = tmp_path / "s.db"
    with StateLock(path) as lock, StateStore.open(path, ID) as s:
        s.put(full_record())
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["s.db", "s.db-shm", "s.db-wal", "s.db.lock"]
        for p in tmp_path.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert lock.path == tmp_path / "s.db.lock"


@pytest.mark.parametrize("dangling", [True, False])
def test_symlink_at_state_path_refused(tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "target"
    if not dangling:
        target.write_bytes(b"precious")
    link = tmp_path / "s.db"
    link.symlink_to(target)
    for attempt in (
        lambda: StateStore.open(link, ID),
        lambda: StateStore.read_only(link, ID),
    ):
        with pytest.raises(StateError, match="is a symbolic link"):
            attempt()
    assert target.read_bytes() == b"precious" if not dangling else not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db"] + ([] if dangling else ["target"])


def test_symlink_at_companion_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    make_store(path)
    target = tmp_path / "elsewhere"
    (tmp_path / "s.db-wal").symlink_to(target)
    with pytest.raises(StateError, match=r"s\.db-wal is a symbolic link"):
        StateStore.open(path, ID)
    assert not target.exists()


@pytest.mark.parametrize("dangling", [True, False])
def test_symlink_at_lock_path_refused(tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "target"
    if not dangling:
        target.write_bytes(b"precious")
    (tmp_path / "s.db.lock").symlink_to(target)
    with pytest.raises(StateError, match="symbolic link"):
        StateLock(tmp_path / "s.db").acquire()
    assert target.read_bytes() == b"precious" if not dangling else not target.exists()


def test_not_a_regular_file_and_leftovers(tmp_path: Path) -> None:
    (tmp_path / "d.db").mkdir()
    with pytest.raises(StateError, match="not a regular file"):
        StateStore.open(tmp_path / "d.db", ID)
    (tmp_path / "s.db-wal").write_bytes(b"old wal")
    with pytest.raises(StateError, match="leftovers"):
        StateStore.open(tmp_path / "s.db", ID)
    assert not (tmp_path / "s.db").exists()


# ------------------------------------------------------------------ refusals (row 11)


def _random(path: Path) -> None:
    path.write_bytes(random.Random(1).randbytes(16384))


def _truncated(path: Path) -> None:
    make_store(path, records=60, payload=3000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _other_manifest(path: Path) -> None:
    make_store(path, identity="a.yaml")


def _newer(path: Path) -> None:
    make_store(path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def _foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()


def _no_meta(path: Path) -> None:
    make_store(path)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM meta WHERE key = 'identity'")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    "make,expected",
    [
        (_random, r"is not a batchrun state file \(not an SQLite database\)"),
        (_truncated, r"is corrupt or truncated"),
        (_empty, r"is empty, not a batchrun state file"),
        (_other_manifest, r"belongs to manifest 'a\.yaml', not 'b\.yaml': pass --state"),
        (_newer, r"newer batchrun \(state schema 2; .*: upgrade batchrun"),
        (_foreign_sqlite, r"not a batchrun state file"),
        (_no_meta, r"incomplete metadata \(missing identity\)"),
    ],
)
def test_refusals_leave_the_file_unchanged(
    tmp_path: Path, make: Callable[[Path], None], expected: str
) -> None:
    path = tmp_path / "s.db"
    make(path)
    before = files_of(path)
    identity = "b.yaml"
    for attempt in (
        lambda: StateStore.open(path, identity),
        lambda: StateStore.open(path, identity, create=False),
        lambda: StateStore.read_only(path, identity),
    ):
        with pytest.raises(StateError) as info:
            attempt()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"state file {path} ")
        assert __import__("re").search(expected, message), message
        assert files_of(path) == before


# ------------------------------------------------------------------ kill -9 (row 2)

WRITER = r"""
import random, sys
from pathlib import Path
from batchrun.model import RunRecord
from batchrun.state import StateStore
N = 5
s = StateStore.open(Path(sys.argv[1]), "m.yaml")
recs = s.records()
n = min(int(r.fingerprint[1:]) for r in recs.values()) + 1 if len(recs) == N else 0
def rec(i, n):
    return RunRecord(name=f"r{i}", fingerprint=f"v{n}", phase="submitted", key=f"k{n}",
                     attempt=n, run_id=f"run-{n}", output_bytes=n, updated_at=float(n + 1),
                     error=f"e{n}:" + "x" * random.randint(0, 30000))
while True:
    if n % 2:
        s.put_many(rec(i, n) for i in range(N))
    else:
        for i in range(N):
            s.put(rec(i, n))
    print(n, flush=True)
    n += 1
"""


def test_kill9_during_writes_leaves_committed_versions(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    rng = random.Random()
    last_seen = -1
    for _ in range(4):
        proc = run_py(WRITER, str(path))
        assert proc.stdout is not None
        first = proc.stdout.readline()  # at least one iteration committed
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        lines = [ln for ln in (first + rest).split("\n") if ln.strip()]
        last = int(lines[-1])
        assert last >= last_seen
        records = StateStore.read_only(path, ID)
        assert set(records) == {f"r{i}" for i in range(5)}
        for r in records.values():
            v = int(r.fingerprint[1:])
            assert last <= v <= last + 1, (r.name, v, last)
            assert (r.key, r.attempt, r.run_id, r.output_bytes, r.updated_at) == (
                f"k{v}",
                v,
                f"run-{v}",
                v,
                float(v + 1),
            )
            assert r.error is not None and r.error.startswith(f"e{v}:")
            assert set(r.error[len(f"e{v}:") :]) <= {"x"}
            assert r.history == tuple(f"run-{k}" for k in range(v))
        last_seen = last
    StateStore.open(path, ID).close()  # and it opens for writing


# ------------------------------------------------------------------ lock (row 10)

HOLDER = r"""
import sys, time
from pathlib import Path
from batchrun.state import StateLock
lock = StateLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_lock_holder_named_and_sigkill_leaves_no_stale_lock(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    proc = run_py(HOLDER, str(path))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        with pytest.raises(LockHeldError) as info:
            StateLock(path, manifest="nightly.yaml").acquire()
        msg = str(info.value)
        assert (
            f"state {path} is locked by pid {proc.pid} on host {socket.gethostname()} since 20"
            in msg
        )
        assert msg.endswith("(`batchrun unlock nightly.yaml` if that process is gone)")
        with pytest.raises(LockHeldError, match=f"pid {proc.pid} .*still running"):
            force_unlock(path)
        assert (tmp_path / "s.db.lock").exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with StateLock(path) as lock:  # the kernel dropped the dead holder's lock
        assert lock.held
        info_now = json.loads((tmp_path / "s.db.lock").read_text())
        assert info_now["pid"] == os.getpid()
    assert (tmp_path / "s.db.lock").read_bytes() == b""  # cleared on release


def test_lock_excludes_within_process_and_force_unlock(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    assert force_unlock(path) is None
    first = StateLock(path)
    first.acquire()
    with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
        StateLock(path).acquire()
    first.release()
    first.release()  # idempotent
    desc = force_unlock(path)
    assert desc is not None and "removed lock file" in desc
    assert not (tmp_path / "s.db.lock").exists()
    with StateLock(path):
        pass


# ------------------------------------------------------------------ disk full (row 13)

DISK_CHILD = r"""
import errno, json, os, resource, signal, sys
from pathlib import Path
from batchrun.errors import DiskError
from batchrun.model import RunRecord
from batchrun.state import StateStore
path, how = Path(sys.argv[1]), sys.argv[2]
s = StateStore.open(path, "m.yaml")
if how == "rlimit":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = max(32768, path.stat().st_size) + 8192
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
else:
    fd = os.open(path.parent / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    for chunk in (1 << 16, 512):
        try:
            while True:
                os.write(fd, b"\0" * chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    os.close(fd)
out = {}
for i in range(2):
    try:
        s.put(RunRecord(name="r0", fingerprint="new", phase="planned", error="y" * 300000))
        out[f"put{i}"] = None
    except DiskError as exc:
        out[f"put{i}"] = str(exc)
out["r0"] = s.get("r0").fingerprint
print(json.dumps(out), flush=True)
"""


def _disk_full(path: Path, how: str) -> None:
    make_store(path, records=3)
    before = StateStore.read_only(path, ID)
    proc = run_py(DISK_CHILD, str(path), how)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    result = json.loads(out)
    expected = f"cannot write state file {path}: "
    for key in ("put0", "put1"):
        assert result[key] is not None and result[key].startswith(expected), result
        assert f"free space in {path.parent} and apply again" in result[key]
    assert result["r0"] == before["r0"].fingerprint
    assert StateStore.read_only(path, ID) == before


def test_disk_full_rlimit_fsize(tmp_path: Path) -> None:
    _disk_full(tmp_path / "s.db", "rlimit")


def test_disk_full_tmpfs(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        path = mnt / "s.db"
        _disk_full(path, "fill")
        (mnt / "filler").unlink()
        with StateStore.open(path, ID) as s:  # space freed: writable again
            s.put(full_record("r9"))
        assert "r9" in StateStore.read_only(path, ID)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_columns_are_the_record_fields_in_order() -> None:
    """Rows are decoded positionally into RunRecord: the two orders must agree."""
    import dataclasses

    from batchrun import state as state_mod

    assert tuple(f.name for f in dataclasses.fields(RunRecord)) == state_mod._COLUMNS
