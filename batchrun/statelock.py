"""The state lock: one apply per state file, enforced by the kernel.

`StateLock` takes an ``flock(LOCK_EX | LOCK_NB)`` on a separate file,
``<state>.lock`` (mode 0600, never opened through a symlink). Because the lock
belongs to an open file description, the kernel drops it when the holder dies,
however it dies (SIGKILL included): there is no stale lock to clean up after a
crash. The holder writes ``{"pid", "host", "since"}`` into the file after
acquiring it, so a second apply can say who holds the state.

The lock file is never removed on release (removing an flock'd file races with
a process that opened it just before the removal). `force_unlock` removes it
only while holding the lock itself, and `acquire` checks after locking that the
path still names the file it locked, retrying otherwise.

The descriptor is opened close-on-exec (PEP 446), so apps started by the apply
(subprocess) do not inherit the lock. A plain ``os.fork()`` without exec would:
do not fork while holding it. Like SQLite's WAL mode, this assumes a local file
system.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from batchrun.errors import LockHeldError, StateError

_MAX_HOLDER_BYTES = 4096


def lock_path_for(state_path: Path) -> Path:
    """``<state>.lock``, beside the state file."""
    return state_path.with_name(state_path.name + ".lock")


def _clean(text: object, limit: int = 200) -> str:
    """A holder field made safe to print on one line."""
    s = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return s[:limit]


def _describe_holder(raw: bytes) -> str:
    """'pid 1234 on host H since T' from the lock file's content, or a fallback."""
    try:
        info = json.loads(raw.decode("utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not an object")
        pid, host, since = info["pid"], info["host"], info["since"]
    except (ValueError, KeyError, UnicodeDecodeError):
        return "another process (holder unknown)"
    return f"pid {_clean(pid)} on host {_clean(host)} since {_clean(since)}"


def _read_holder(fd: int) -> bytes:
    try:
        return os.pread(fd, _MAX_HOLDER_BYTES, 0)
    except OSError:
        return b""


def _open_lock_file(path: Path, *, create: bool) -> int | None:
    """Open the lock file without following a symlink; None if absent and not creating."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise StateError(f"cannot create lock file {path}: its folder does not exist") from None
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(
                f"lock file {path} is a symbolic link: refusing to use it; "
                "remove the link and apply again"
            ) from None
        raise StateError(f"cannot open lock file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateError(f"lock file {path} is not a regular file: remove it and apply again")
        if stat.S_IMODE(st.st_mode) != 0o600 and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _held_error(state_path: Path, raw: bytes, manifest: str | None) -> LockHeldError:
    who = _describe_holder(raw)
    target = manifest if manifest else "MANIFEST"
    return LockHeldError(
        f"state {state_path} is locked by {who} "
        f"(`batchrun unlock {target}` if that process is gone)"
    )


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


class StateLock:
    """An exclusive, non-blocking, kernel-held lock on a state file.

    ``manifest`` (optional, keyword-only) only improves the message of
    `LockHeldError` (`batchrun unlock <manifest>`).
    """

    def __init__(self, state_path: Path, *, manifest: str | Path | None = None) -> None:
        self.state_path = Path(state_path)
        self.path = lock_path_for(self.state_path)
        self._manifest = str(manifest) if manifest is not None else None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise `LockHeldError` at once, naming the holder."""
        if self._fd is not None:
            raise StateError(f"lock {self.path} is already held by this StateLock")
        for _ in range(10):
            fd = _open_lock_file(self.path, create=True)
            assert fd is not None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raw = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise _held_error(self.state_path, raw, self._manifest) from None
                raise StateError(f"cannot lock {self.path}: {exc.strerror}") from None
            if not _same_file(fd, self.path):
                # force_unlock removed (or someone replaced) the file between our
                # open and our flock: the lock we hold guards nothing. Try again.
                os.close(fd)
                continue
            try:
                self._write_holder(fd)
            except OSError as exc:
                os.close(fd)
                raise StateError(f"cannot write lock file {self.path}: {exc.strerror}") from None
            self._fd = fd
            return
        raise StateError(f"cannot lock {self.path}: the lock file keeps being replaced")

    @staticmethod
    def _write_holder(fd: int) -> None:
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        data = (json.dumps(info, sort_keys=True) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        """Drop the lock (idempotent). The lock file stays; its content is cleared."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - safety net only
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)


def force_unlock(state_path: Path, *, manifest: str | Path | None = None) -> str | None:
    """For `batchrun unlock`: remove the lock file unless a live process holds it.

    Returns a description of what was removed, or None when there was no lock
    file. Raises `LockHeldError` (naming the holder) when the lock is held:
    with an flock, a held lock means a live process (or one of its children)
    still has it open.
    """
    path = lock_path_for(Path(state_path))
    fd = _open_lock_file(path, create=False)
    if fd is None:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raw = _read_holder(fd)
                held = _held_error(
                    Path(state_path), raw, None if manifest is None else str(manifest)
                )
                raise LockHeldError(
                    held.message.split(" (`batchrun unlock")[0]
                    + ": that process is still running; stop it first"
                ) from None
            raise StateError(f"cannot lock {path}: {exc.strerror}") from None
        raw = _read_holder(fd)
        if _same_file(fd, path):
            os.unlink(path)
        last = _describe_holder(raw) if raw.strip() else "no holder recorded"
        return f"removed lock file {path} (last holder: {last}; not running)"
    finally:
        os.close(fd)
