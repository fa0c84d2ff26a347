"""The durable state store: one SQLite file per manifest, one row per run.

What it promises (reliability.md rows 2, 11, 13, 16, 17):

- Every `put`/`put_many` is one committed transaction in WAL mode with
  ``synchronous=FULL``: after it returns the record survives a crash, and a
  kill at any moment leaves each row at its old or its new version, never torn.
- The file is tied to its manifest by an *identity*: the manifest's file name
  (basename), not its absolute path, so a nightly CI that clones into a new
  folder finds its state again. A state file from another manifest, a newer
  batchrun, or one that is corrupt, truncated, empty or not SQLite at all is
  refused with one line naming the file and what to do. It is never silently
  replaced by a fresh one: that would resubmit every run.
- The state file and its ``-wal``/``-shm`` companions are mode 0600 whatever the
  umask: a new state file is built under a temporary name created with
  ``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600 before SQLite touches it, then
  hard-linked into place (so the state path either does not exist or holds a
  complete, initialised store); SQLite gives its companions the database's mode.
- A symlink (or anything but a regular file) at the state path or at one of
  its companions is refused before SQLite opens anything.
- Disk full or an I/O error while writing raises `DiskError`; SQLite rolls the
  transaction back, so the file stays at its last committed version. After
  that the store refuses further writes (a failed fsync is fatal).
- No secret goes in: `put` refuses (ValueError, a programming error) a record
  whose strings look like a presigned-URL signature or a bearer token, or
  contain one of the ``secrets`` given to `StateStore.open`.

Note for callers: SQLite's locks are POSIX locks, which a process loses when it
closes *any* descriptor of the database file. Do not open/close the state file
by hand while a `StateStore` on it is open in the same process.

The store is not the apply lock: take `StateLock` (batchrun.statelock) first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, get_args
from urllib.parse import quote

from batchrun.errors import DiskError, LockHeldError, StateError
from batchrun.model import Phase, RunRecord
from batchrun.statelock import StateLock, force_unlock, lock_path_for

__all__ = [
    "STATE_SCHEMA_VERSION",
    "LockHeldError",
    "StateLock",
    "StateStore",
    "default_state_path",
    "force_unlock",
    "lock_path_for",
    "manifest_identity",
]

STATE_SCHEMA_VERSION: int = 1
APPLICATION_ID = 0x42524E31  # "BRN1" in the SQLite header: a batchrun state file
_SQLITE_MAGIC = b"SQLite format 3\x00"
_COMPANIONS = ("-wal", "-shm", "-journal")
_PHASES: frozenset[str] = frozenset(get_args(Phase))
_FORBIDDEN_CI = ("sig=", "x-amz-signature", "signature=")  # matched case-insensitively
_FORBIDDEN_CS = ("Bearer ",)  # matched as written: "bearer" alone is an ordinary word

_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_SQLITE_READONLY = 8
_SQLITE_CANTOPEN = 14

_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE runs (
    name          TEXT PRIMARY KEY,
    fingerprint   TEXT NOT NULL,
    phase         TEXT NOT NULL,
    key           TEXT,
    attempt       INTEGER NOT NULL,
    upload_id     TEXT,
    uploaded_at   REAL,
    run_id        TEXT,
    output_path   TEXT,
    output_sha256 TEXT,
    output_bytes  INTEGER,
    error         TEXT,
    history       TEXT NOT NULL,
    updated_at    REAL NOT NULL
);
"""

_COLUMNS = (
    "name", "fingerprint", "phase", "key", "attempt", "upload_id", "uploaded_at", "run_id",
    "output_path", "output_sha256", "output_bytes", "error", "history", "updated_at",
)  # fmt: skip
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM runs"
_HISTORY = _COLUMNS.index("history")
_PHASE = _COLUMNS.index("phase")
_UPSERT = (
    f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)


def default_state_path(manifest_path: Path) -> Path:
    """``<dir>/<stem>.batchrun-state.db``, beside the manifest."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(f"{manifest_path.stem}.batchrun-state.db")


def manifest_identity(manifest_path: Path) -> str:
    """What ties a state file to its manifest: the manifest's file name.

    Deliberately not the absolute path: nightly CI clones the repository into a
    new folder every time and must find its state again. The price: two
    manifests with the same file name in different folders are told apart only
    by their state paths (the default is beside each manifest, so they differ;
    an explicit shared ``--state`` would not be caught).
    """
    return Path(manifest_path).name


# --------------------------------------------------------------------------- checks


def _refuse(path: Path, what: str, todo: str) -> StateError:
    return StateError(f"state file {path} {what}: {todo}")


_MOVE_AWAY = (
    "restore it from a backup, or move it away and pass --state to use another file "
    "(starting fresh would resubmit every run)"
)


def _check_not_link(path: Path) -> os.stat_result | None:
    """lstat `path`; refuse a symlink or a non-regular file. None if absent."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot examine state file {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise StateError(
            f"state file {path} is a symbolic link: refusing to write through it; "
            "remove the link or pass --state with the real path"
        )
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"state file {path} is not a regular file: move it away or pass --state")
    return st


def _companions(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in _COMPANIONS]


def _check_companions(path: Path) -> set[Path]:
    """Refuse symlinked/odd companions; return the ones that exist."""
    present: set[Path] = set()
    for comp in _companions(path):
        if _check_not_link(comp) is not None:
            present.add(comp)
    return present


def _check_header(path: Path) -> None:
    """Cheap checks SQLite would report less clearly: empty, not SQLite, too short."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "is a symbolic link", "remove the link") from None
        raise StateError(f"cannot read state file {path}: {exc.strerror}") from None
    try:
        head = os.read(fd, 100)
        size = os.fstat(fd).st_size
    finally:
        # Closed before SQLite opens the file (POSIX locks, see the module doc).
        os.close(fd)
    if size == 0:
        raise _refuse(path, "is empty, not a batchrun state file", _MOVE_AWAY)
    if not head.startswith(_SQLITE_MAGIC):
        raise _refuse(path, "is not a batchrun state file (not an SQLite database)", _MOVE_AWAY)
    if len(head) < 100 or size < 512:
        raise _refuse(path, "is corrupt or truncated", _MOVE_AWAY)


def _remove_new_companions(path: Path, before: set[Path]) -> None:
    """After a refusal, remove the empty -wal/-shm SQLite created for its look."""
    wal, shm, _ = _companions(path)
    if wal in before or shm in before:
        return
    with contextlib.suppress(OSError):
        if os.lstat(wal).st_size == 0:
            os.unlink(wal)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shm)


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    mode = "ro" if readonly else "rw"
    uri = f"file:{quote(str(path.absolute()))}?mode={mode}"
    try:
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0
        )
    except sqlite3.Error as exc:
        raise StateError(f"cannot open state file {path}: {exc}") from None
    return conn


def _validate(conn: sqlite3.Connection, path: Path, identity: str) -> dict[str, str]:
    """Integrity, application id, meta, schema version, identity. Returns meta."""
    try:
        check = conn.execute("PRAGMA quick_check(1)").fetchone()
        if check is None or check[0] != "ok":
            raise _refuse(
                path, f"is corrupt or truncated ({check[0] if check else 'no answer'})", _MOVE_AWAY
            )
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if app_id != APPLICATION_ID or "meta" not in tables:
            raise _refuse(
                path,
                "is an SQLite database but not a batchrun state file (no batchrun metadata)",
                "pass --state to use another file",
            )
        meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    except sqlite3.DatabaseError as exc:
        what = (
            "is not a batchrun state file (not an SQLite database)"
            if "not a database" in str(exc)
            else f"is corrupt or truncated ({exc})"
        )
        raise _refuse(path, what, _MOVE_AWAY) from None
    missing = [k for k in ("schema_version", "identity", "lineage") if k not in meta]
    if missing:
        raise _refuse(path, f"has incomplete metadata (missing {', '.join(missing)})", _MOVE_AWAY)
    try:
        version = int(meta["schema_version"])
    except ValueError:
        raise _refuse(path, "has an unreadable schema version", _MOVE_AWAY) from None
    if version > STATE_SCHEMA_VERSION:
        raise _refuse(
            path,
            f"was written by a newer batchrun (state schema {version}; "
            f"this batchrun reads up to {STATE_SCHEMA_VERSION})",
            "upgrade batchrun",
        )
    if version < 1 or "runs" not in tables:
        raise _refuse(path, f"has an unknown state schema {version}", _MOVE_AWAY)
    if meta["identity"] != identity:
        raise StateError(
            f"state file {path} belongs to manifest {meta['identity']!r}, not {identity!r}: "
            "pass --state to use another file"
        )
    return meta


def _decode(path: Path, row: tuple[Any, ...]) -> RunRecord:
    # Positional: _COLUMNS is RunRecord's field order (tests/test_state.py pins
    # it); a keyword dict per row was a third of reading 10,000 records.
    try:
        raw_history = row[_HISTORY]
        # Most runs have no history: skip the parser for the common case.
        history = [] if raw_history == "[]" else json.loads(raw_history)
        if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
            raise ValueError("history is not a list of strings")
        if row[_PHASE] not in _PHASES:
            raise ValueError(f"unknown phase {row[_PHASE]!r}")
        values = (*row[:_HISTORY], tuple(history), *row[_HISTORY + 1 :])
        return RunRecord(*values)
    except (ValueError, TypeError, IndexError) as exc:
        raise _refuse(
            path, f"has an unreadable row {row[0] if row else None!r} ({exc})", _MOVE_AWAY
        ) from None


def _read_all(conn: sqlite3.Connection, path: Path) -> dict[str, RunRecord]:
    try:
        rows = conn.execute(_SELECT + " ORDER BY name").fetchall()
    except sqlite3.DatabaseError as exc:
        raise _refuse(path, f"cannot be read ({exc})", _MOVE_AWAY) from None
    return {row[0]: _decode(path, row) for row in rows}


def _string_fields(record: RunRecord) -> Iterator[tuple[str, str]]:
    for name in _COLUMNS:
        if name == "history":
            for i, item in enumerate(record.history):
                yield f"history[{i}]", item
            continue
        value = getattr(record, name)
        if isinstance(value, str):
            yield name, value


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        raise DiskError(f"cannot sync folder {directory}: {exc.strerror}") from None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- store


class StateStore:
    """An open, validated state file. Use `StateStore.open`, not the constructor."""

    def __init__(
        self, path: Path, conn: sqlite3.Connection, meta: dict[str, str], secrets: tuple[str, ...]
    ) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._meta = meta
        self._secrets = secrets
        self._mutex = threading.Lock()
        self._failed: DiskError | None = None

    # ---- opening

    @classmethod
    def open(
        cls, path: Path, identity: str, *, create: bool = True, secrets: Iterable[str] = ()
    ) -> StateStore:
        """Open (and with ``create``, first create) the state file for writing.

        ``secrets``: strings that must never be stored (e.g. the API key);
        `put` refuses a record containing one.
        """
        path = Path(path)
        st = _check_not_link(path)
        present = _check_companions(path)
        if st is None:
            if not create:
                raise StateError(f"state file {path} does not exist: apply first, or pass --state")
            if present:
                names = ", ".join(sorted(p.name for p in present))
                raise StateError(
                    f"state file {path} does not exist but {names} does: these are leftovers "
                    "of another database; move them away and apply again"
                )
            cls._create(path, identity)
            present = _check_companions(path)
        _check_header(path)
        conn = _connect(path, readonly=False)
        try:
            meta = _validate(conn, path, identity)
            conn.execute("PRAGMA busy_timeout = 10000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StateError(f"state file {path}: cannot use WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            conn.close()
            raise _map_write_error(path, exc) from None
        except BaseException:
            conn.close()
            _remove_new_companions(path, present)
            raise
        if stat.S_IMODE(os.lstat(path).st_mode) & 0o077 and os.lstat(path).st_uid == os.geteuid():
            os.chmod(path, 0o600, follow_symlinks=False)
        return cls(path, conn, meta, tuple(s for s in secrets if s))

    @staticmethod
    def _create(path: Path, identity: str) -> None:
        """Build a complete store under a private temporary name, then link it in place."""
        directory = path.parent
        if not directory.is_dir():
            raise StateError(f"cannot create state file {path}: folder {directory} does not exist")
        tmp = directory / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(
                tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise _disk_or_state(path, exc, "create") from None
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        try:
            conn = _connect(tmp, readonly=False)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {STATE_SCHEMA_VERSION}")
                meta = {
                    "schema_version": str(STATE_SCHEMA_VERSION),
                    "identity": identity,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "lineage": str(uuid.uuid4()),
                    "writer": "batchrun",
                }
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
                conn.execute("COMMIT")
            finally:
                conn.close()  # checkpoints and removes the temporary -wal/-shm
            try:
                os.link(tmp, path, follow_symlinks=False)
            except FileExistsError:
                pass  # created meanwhile by someone else: open() validates theirs
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                if not os.path.lexists(path):  # no hard links here: rename instead
                    os.rename(tmp, path)
            _fsync_dir(directory)
        except sqlite3.Error as exc:
            raise _map_write_error(path, exc) from None
        except OSError as exc:
            raise _disk_or_state(path, exc, "create") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @classmethod
    def read_only(cls, path: Path, identity: str) -> dict[str, RunRecord]:
        """The records, for plan/status: no lock, never creates; missing file → {}.

        Refuses exactly what `open` refuses. Safe while an apply writes (WAL).
        """
        path = Path(path)
        if _check_not_link(path) is None:
            return {}
        present = _check_companions(path)
        _check_header(path)
        conn = _connect(path, readonly=True)
        try:
            _validate(conn, path, identity)
            return _read_all(conn, path)
        except BaseException:
            conn.close()
            _remove_new_companions(path, present)
            raise
        finally:
            conn.close()

    # ---- metadata

    @property
    def identity(self) -> str:
        return self._meta["identity"]

    @property
    def lineage(self) -> str:
        """A uuid fixed at creation: tells copies of one state file from unrelated ones."""
        return self._meta["lineage"]

    @property
    def created_at(self) -> str:
        return self._meta.get("created_at", "")

    @property
    def schema_version(self) -> int:
        return int(self._meta["schema_version"])

    # ---- reading

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"state file {self.path} is closed")
        return self._conn

    def records(self) -> dict[str, RunRecord]:
        with self._mutex:
            return _read_all(self._c(), self.path)

    def get(self, name: str) -> RunRecord | None:
        with self._mutex:
            try:
                row = self._c().execute(_SELECT + " WHERE name = ?", (name,)).fetchone()
            except sqlite3.DatabaseError as exc:
                raise _refuse(self.path, f"cannot be read ({exc})", _MOVE_AWAY) from None
            return None if row is None else _decode(self.path, row)

    # ---- writing

    def _check(self, record: RunRecord) -> None:
        if not isinstance(record, RunRecord):
            raise TypeError(f"expected RunRecord, got {type(record).__name__}")
        if record.phase not in _PHASES:
            raise ValueError(f"run {record.name!r}: unknown phase {record.phase!r}")
        for field, value in _string_fields(record):
            lowered = value.lower()
            if (
                any(m in lowered for m in _FORBIDDEN_CI)
                or any(m in value for m in _FORBIDDEN_CS)
                or any(s in value for s in self._secrets)
            ):
                # Name the field, never the value: it is a secret.
                raise ValueError(
                    f"run {record.name!r}: field {field} looks like it contains a secret "
                    "(signature, bearer token or API key); redact it before storing"
                )

    def _row(self, record: RunRecord, now: float) -> tuple[Any, ...]:
        stored = (
            self._c()
            .execute("SELECT run_id, history FROM runs WHERE name = ?", (record.name,))
            .fetchone()
        )
        history: list[str] = []
        if stored is not None:
            old = json.loads(stored[1])
            history.extend(h for h in old if isinstance(h, str))
        for h in record.history:
            if h not in history:
                history.append(h)
        previous = None if stored is None else stored[0]
        if previous is not None and previous != record.run_id and previous not in history:
            history.append(previous)
        row: dict[str, Any] = {name: getattr(record, name) for name in _COLUMNS}
        row["history"] = json.dumps(history)
        row["updated_at"] = record.updated_at if record.updated_at else now
        return tuple(row[name] for name in _COLUMNS)

    def put(self, record: RunRecord) -> None:
        """Store one record in one committed, durable transaction.

        History is kept by the store: the stored history, then any new ids of
        ``record.history``, then the stored run id if the new record's differs
        (a rerun). ``updated_at == 0.0`` means "now".
        """
        self.put_many((record,))

    def put_many(self, records: Iterable[RunRecord]) -> None:
        """Store several records in one transaction (one fsync): all or none."""
        batch = list(records)
        for record in batch:
            self._check(record)
        if not batch:
            return
        with self._mutex:
            if self._failed is not None:
                raise DiskError(self._failed.message)
            conn = self._c()
            now = time.time()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for record in batch:
                        conn.execute(_UPSERT, self._row(record, now))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                err = _map_write_error(self.path, exc)
                if isinstance(err, DiskError):
                    self._failed = err
                raise err from None

    # ---- closing

    def close(self) -> None:
        """Close the file (idempotent); the last connection checkpoints the WAL."""
        with self._mutex:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- errors


def _disk_message(path: Path, why: str) -> str:
    folder = path.parent if str(path.parent) else Path(".")
    return f"cannot write state file {path}: {why}; free space in {folder} and apply again"


def _disk_or_state(path: Path, exc: OSError, verb: str) -> StateError | DiskError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiskError(_disk_message(path, "disk full"))
    if exc.errno in (errno.EIO, errno.EROFS):
        return DiskError(f"cannot {verb} state file {path}: {exc.strerror}")
    return StateError(f"cannot {verb} state file {path}: {exc.strerror}")


def _map_write_error(path: Path, exc: sqlite3.Error) -> StateError | DiskError:
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if primary == _SQLITE_FULL or "disk is full" in text:
        return DiskError(_disk_message(path, "disk full"))
    if primary == _SQLITE_IOERR or "disk I/O error" in text:
        name = getattr(exc, "sqlite_errorname", "SQLITE_IOERR")
        return DiskError(
            _disk_message(path, f"write failed ({name}: disk full, file too large or I/O error)")
        )
    if primary == _SQLITE_READONLY:
        return DiskError(f"cannot write state file {path}: it is read-only ({text})")
    if primary == _SQLITE_CANTOPEN:
        return StateError(f"cannot open state file {path}: {text}")
    if isinstance(exc, sqlite3.DatabaseError) and primary in (11, 26):  # CORRUPT, NOTADB
        return _refuse(path, f"is corrupt or truncated ({text})", _MOVE_AWAY)
    return StateError(f"state file {path}: {text}")
