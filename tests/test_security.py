"""Rows 14-17 and 19 end to end: on what the servers SAW, and what is on disk.

- the API key reaches only the API origin: never storage (the emulator counts
  Authorization headers on storage routes), never a redirect target (a loopback
  redirector in front of a recording server / the real emulator);
- no key or presigned signature in DEBUG logs, `--json` events, error messages,
  `status`/`plan` output or the state file, on a batch forced to fail many ways;
- state and lock files are 0600 under umask 022;
- symlinks at the state, lock, temp or output path: nothing written through them;
- path traversal refused before any request.

https → http downgrade on redirect cannot be shown end to end without a TLS
server; it is covered at unit level (httpx MockTransport) by
tests/test_client.py::test_cross_origin_redirect_refused[http://api.test/...].
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.apply_helpers import (
    big_json,
    cli_env,
    popen_cli,
    run_cli,
    write_json,
    write_manifest,
)
from tests.reliability_helpers import (
    MIB,
    assert_no_secret,
    compact,
    echo_output,
    load_state,
    state_dump,
    state_path,
)


class Recorder(ThreadingHTTPServer):
    """A loopback server recording the headers of every request it gets."""

    daemon_threads = True

    def __init__(self, redirect_to: str | None = None) -> None:
        self.seen: list[dict[str, str]] = []
        self.redirect_to = redirect_to
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                outer.seen.append({k.lower(): v for k, v in self.headers.items()})
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                if outer.redirect_to is not None:
                    self.send_response(307)
                    self.send_header("Location", outer.redirect_to + self.path)
                else:
                    self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_PATCH = _any

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def recorders() -> Iterator[list[Recorder]]:
    made: list[Recorder] = []
    yield made
    for r in made:
        r.close()


# -- row 14: the key goes to the API origin only -------------------------------------


def test_storage_never_sees_an_authorization_header_even_on_retries(
    tmp_path: Path, emulator_factory: Any
) -> None:
    emu = emulator_factory(seed=3, faults={"cut_download_rate": 0.3, "cut_upload_rate": 0.3})
    emu.set_faults(expire_uploads=1)
    big = big_json(tmp_path / "big.json", 5 * MIB + 10)
    small = write_json(tmp_path / "small.json", {"x": 1})
    manifest = write_manifest(
        tmp_path,
        emu.api_url,
        [{"name": "big", "input": "big.json"}, {"name": "small", "input": "small.json"}],
    )
    result = run_cli("apply", manifest, api_key=emu.api_key)
    assert result.returncode == 0, result.stderr
    stats = emu.stats()
    assert stats["requests_by_route"]["upload"] >= 2  # the expired URL forced a second PUT
    assert stats["requests_by_route"]["download"] >= 2
    assert stats["storage_auth_headers"] == 0
    assert stats["api_auth_failures"] == 0  # while every API call did carry the key
    assert (tmp_path / "out" / "big.json").read_bytes() == echo_output(big.read_bytes())
    assert (tmp_path / "out" / "small.json").read_bytes() == echo_output(compact(small))


def test_redirect_to_another_origin_carries_no_key(
    tmp_path: Path, emulator: Any, recorders: list[Recorder]
) -> None:
    # The redirect target is the real emulator (another port): had the client
    # followed with the key, the run would have been created there.
    target = Recorder()
    redirector = Recorder(redirect_to=emulator.api_url)
    recorders += [target, redirector]
    write_json(tmp_path / "a.json", {})
    manifest = write_manifest(tmp_path, redirector.url, [{"name": "a", "input": "a.json"}])
    result = run_cli("--log-level", "debug", "apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 1
    assert "not followed" in result.stdout
    assert redirector.seen and all(
        h.get("authorization") == f"Bearer {emulator.api_key}" for h in redirector.seen
    )
    stats = emulator.stats()
    assert stats["requests_by_route"] == {}  # nothing reached the other origin
    assert stats["runs_created"] == 0
    assert_no_secret(result.stdout + result.stderr, emulator.api_key, "apply output")

    # And a redirector pointing at a plain recording server: it sees no request at all.
    redirector.redirect_to = target.url
    again = run_cli("apply", manifest, api_key=emulator.api_key)
    assert again.returncode == 1
    assert target.seen == []


# -- row 15: no secret in logs, events, errors, state --------------------------------


def test_failing_batch_at_debug_leaks_no_secret(tmp_path: Path, emulator: Any) -> None:
    big_json(tmp_path / "big.json", 5 * MIB + 10)  # every upload URL expired
    write_json(tmp_path / "ok.json", {"ok": 1})
    write_json(tmp_path / "bad.json", {"bad": 1})  # the app fails
    write_json(tmp_path / "dl.json", {"dl": 1})  # its download links are refused (403)
    manifest = write_manifest(
        tmp_path,
        emulator.api_url,
        [
            {"name": "big", "input": "big.json"},
            {"name": "ok", "input": "ok.json"},
            {"name": "bad", "input": "bad.json", "app": "fail"},
            {"name": "dl", "input": "dl.json", "app": "cat"},
        ],
        concurrency=1,
    )
    emulator.set_faults(expire_uploads=3, fail_next={"download": 10}, fail_next_status=403)
    outputs: list[tuple[str, str]] = []
    for mode in ("--json", "--plain"):
        r = run_cli("--log-level", "debug", "apply", manifest, mode, api_key=emulator.api_key)
        assert r.returncode == 1, r.stderr
        outputs += [(f"apply {mode} stdout", r.stdout), (f"apply {mode} stderr", r.stderr)]
    text = "\n".join(t for _, t in outputs)
    assert "HTTP Request" in text  # DEBUG logging was really on
    assert "Request has expired" in text or "upload URL expired" in text
    assert "boom: bad input" in text
    assert "403" in text
    stats = emulator.stats()
    assert stats["faults_injected"].get("expired_upload_url") == 3
    assert stats["faults_injected"].get("fail_next_403", 0) >= 1
    # The state recorded the failures (so the messages really went through it).
    records = load_state(manifest)
    assert "boom" in (records["bad"].error or "")
    outputs.append(("state after failures", state_dump(manifest)))
    # A 401 (wrong key) and a 403 from the API: their messages carry no key either.
    emulator.set_faults(fail_next={"result": 1}, fail_next_status=403)
    r = run_cli("--log-level", "debug", "apply", manifest, api_key=emulator.api_key)
    outputs += [("api 403 stdout", r.stdout), ("api 403 stderr", r.stderr)]
    r = run_cli("--log-level", "debug", "apply", manifest, api_key="wrong-key-abcdef")
    assert "wrong-key-abcdef" not in r.stdout + r.stderr
    outputs += [("401 stdout", r.stdout), ("401 stderr", r.stderr)]
    for cmd in (("status", manifest, "--json"), ("plan", manifest, "--json")):
        r = run_cli(*cmd, api_key=emulator.api_key)
        outputs.append((cmd[0], r.stdout + r.stderr))
    outputs.append(("state file", state_dump(manifest)))
    for where, content in outputs:
        assert_no_secret(content, emulator.api_key, where)


# -- row 16: file modes -----------------------------------------------------------------


def test_state_and_lock_are_0600_under_umask_022(tmp_path: Path, emulator: Any) -> None:
    write_json(tmp_path / "a.json", {})
    manifest = write_manifest(tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}])
    env = cli_env(emulator.api_key)
    result = subprocess.run(
        [sys.executable, "-m", "batchrun", "apply", str(manifest)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=lambda: os.umask(0o022),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    state = state_path(manifest)
    lock = state.with_name(state.name + ".lock")
    files = [state, lock, *[state.with_name(state.name + s) for s in ("-wal", "-shm")]]
    present = [p for p in files if p.exists()]
    assert state in present and lock in present
    for p in present:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    # The control: the umask really was 022 (outputs are ordinary 0644 files).
    assert stat.S_IMODE((tmp_path / "out" / "a.json").stat().st_mode) == 0o644


# -- row 17: symlinks ---------------------------------------------------------------------


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path.parent / (tmp_path.name + "-victim")
    path.write_bytes(b"precious\n")
    return path


def test_state_path_symlink_refused(tmp_path: Path, emulator: Any, victim: Path) -> None:
    write_json(tmp_path / "a.json", {})
    manifest = write_manifest(tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}])
    state_path(manifest).symlink_to(victim)
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 3
    assert "symbolic link" in result.stderr or "symlink" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert victim.read_bytes() == b"precious\n"
    assert emulator.stats()["requests_by_route"] == {}


def test_lock_path_symlink_refused(tmp_path: Path, emulator: Any, victim: Path) -> None:
    write_json(tmp_path / "a.json", {})
    manifest = write_manifest(tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}])
    lock = state_path(manifest).with_name(state_path(manifest).name + ".lock")
    lock.symlink_to(victim)
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 3
    assert "symbolic link" in result.stderr
    assert victim.read_bytes() == b"precious\n"


def test_output_symlink_refused_before_any_request(
    tmp_path: Path, emulator: Any, victim: Path
) -> None:
    write_json(tmp_path / "a.json", {})
    manifest = write_manifest(tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.json").symlink_to(victim)
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 2
    assert "is a symlink" in result.stderr
    assert victim.read_bytes() == b"precious\n"
    assert emulator.stats()["requests_by_route"] == {}


def test_output_symlink_appearing_after_validation_is_not_written_through(
    tmp_path: Path, emulator: Any, victim: Path
) -> None:
    """A link planted at the output after the plan: the download refuses to write."""
    src = write_json(tmp_path / "a.json", {})
    manifest = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "a", "input": "a.json"}],
        app="sleep",
        defaults={"options": {"duration": 1.0}},
    )
    proc = popen_cli("apply", manifest, env=cli_env(emulator.api_key))
    try:
        deadline = time.monotonic() + 30
        while emulator.stats()["runs_created"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / "a.json").symlink_to(victim)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, out + err
    assert "symbolic link" in out + err
    assert victim.read_bytes() == b"precious\n"
    assert os.path.islink(tmp_path / "out" / "a.json")
    assert src.exists()


def test_temp_path_symlink_is_not_written_through(
    tmp_path: Path, emulator: Any, victim: Path
) -> None:
    src = write_json(tmp_path / "a.json", {"a": 1})
    manifest = write_manifest(tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}])
    (tmp_path / "out").mkdir()
    planted = tmp_path / "out" / ".a.json.batchrun.part"  # the download's temp name
    planted.symlink_to(victim)
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 0, result.stderr
    assert victim.read_bytes() == b"precious\n"
    assert not os.path.lexists(planted)
    assert (tmp_path / "out" / "a.json").read_bytes() == echo_output(compact(src))


# -- row 19: path traversal (validation tests: tests/test_manifest.py corpus) -------------


@pytest.mark.parametrize(
    "run",
    [
        {"name": "a", "input": "a.json", "output": "../escape/{name}.json"},
        {"name": "a", "input": "a.json", "output": "/tmp/escape-{name}.json"},
        {"name": "../a", "input": "a.json"},
    ],
)
def test_traversal_refused_before_any_request(
    tmp_path: Path, emulator: Any, run: dict[str, str]
) -> None:
    write_json(tmp_path / "a.json", {})
    manifest = write_manifest(tmp_path, emulator.api_url, [run])
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 2, result.stderr
    assert emulator.stats()["requests_by_route"] == {}
    assert not (tmp_path.parent / "escape").exists()
    assert not Path("/tmp/escape-a.json").exists()
