"""Rows 3-9, 12, 13 end to end: the real CLI against the emulator's fault knobs.

Assertions are on what the emulator saw (runs per entry, requests per route and
their arrival times) and on what is on disk (outputs, state, temp files).
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.apply_helpers import (
    big_json,
    cli_env,
    popen_cli,
    run_cli,
    sleep_batch,
    write_json,
    write_manifest,
)
from tests.reliability_helpers import (
    MIB,
    compact,
    echo_output,
    leftovers,
    load_state,
)


def one_run(folder: Path, endpoint: str, **top: Any) -> tuple[Path, bytes]:
    src = write_json(folder / "a.json", {"a": 1, "b": [1, 2, 3]})
    manifest = write_manifest(folder, endpoint, [{"name": "a", "input": "a.json"}], **top)
    return manifest, echo_output(compact(src))


def json_events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# -- row 3: create-run processed, answer lost ------------------------------------


@pytest.mark.parametrize("mode", ["502", "reset"])
def test_lost_create_answer_is_adopted_not_resent(tmp_path: Path, emulator: Any, mode: str) -> None:
    manifest, expected = one_run(tmp_path, emulator.api_url)
    emulator.set_faults(lose_next_creates=1, lost_create_mode=mode)
    result = run_cli("apply", manifest, "--json", api_key=emulator.api_key)
    assert result.returncode == 0, result.stderr
    stats = emulator.stats()
    assert stats["faults_injected"] == {f"lost_create_{mode}": 1}
    assert stats["runs_created_by_name"] == {"a": 1}
    assert stats["requests_by_route"]["create"] == 1  # never sent a second time
    assert stats["requests_by_route"]["list"] >= 1  # looked up by its key instead
    adopted = [e for e in json_events(result.stdout) if "(adopted)" in (e.get("message") or "")]
    assert len(adopted) == 1
    assert (tmp_path / "out" / "a.json").read_bytes() == expected


# -- row 4: 429 / 503 with Retry-After ---------------------------------------------


@pytest.mark.parametrize(
    ("route", "status", "fmt"),
    [
        ("create", 429, "seconds"),
        ("create", 429, "date"),
        ("result", 503, "seconds"),
        ("result", 503, "date"),
        ("create", 503, "seconds"),
    ],
)
def test_retry_after_is_waited(
    tmp_path: Path, emulator: Any, route: str, status: int, fmt: str
) -> None:
    wait = 2.0
    manifest, expected = one_run(tmp_path, emulator.api_url)
    emulator.set_faults(
        fail_next={route: 1},
        fail_next_status=status,
        retry_after_s=wait,
        retry_after_format=fmt,
    )
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 0, result.stderr
    stats = emulator.stats()
    times = stats["request_times"][route]
    assert len(times) >= 2
    assert stats["faults_injected"] == {f"fail_next_{status}": 1}
    # The retry came no earlier than the Retry-After (HTTP-date: one-second resolution,
    # the emulator rounds it up, so the bound holds for both forms).
    assert gaps(times)[0] >= wait - 0.05, (fmt, gaps(times))
    assert gaps(times)[0] < wait + 5  # and not absurdly later (jitter is bounded)
    assert stats["runs_created_by_name"] == {"a": 1}
    assert (tmp_path / "out" / "a.json").read_bytes() == expected


# -- row 5: client errors and auth --------------------------------------------------


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_client_error_on_create_is_not_retried(tmp_path: Path, emulator: Any, status: int) -> None:
    manifest, _ = one_run(tmp_path, emulator.api_url)
    emulator.set_faults(fail_next={"create": 1}, fail_next_status=status)
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 1, result.stderr
    stats = emulator.stats()
    assert stats["requests_by_route"]["create"] == 1  # no retry
    assert stats["runs_created"] == 0
    assert f"refused by the service: POST /v1/applications/echo/runs: {status}" in result.stdout
    assert "injected server error" in result.stdout  # the service's own message
    rec = load_state(manifest)["a"]
    assert rec.phase == "failed" and "injected server error" in (rec.error or "")
    again = run_cli("apply", manifest, api_key=emulator.api_key)  # retry: a new run
    assert again.returncode == 0
    assert emulator.stats()["runs_created_by_name"] == {"a": 1}


@pytest.mark.parametrize("status", [401, 403])
def test_auth_error_mid_batch_stops_at_once(tmp_path: Path, emulator: Any, status: int) -> None:
    manifest = sleep_batch(tmp_path, emulator.api_url, 10, duration=0.5, concurrency=2)
    emulator.set_faults(fail_next={"result": 1}, fail_next_status=status)
    t0 = time.monotonic()
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert time.monotonic() - t0 < 15
    assert result.returncode == 1, result.stderr
    assert f"{status}" in result.stdout and "check the API key" in result.stdout
    stats = emulator.stats()
    assert stats["requests_by_route"]["result"] == 1  # never retried
    assert stats["runs_created"] <= 3  # stopped at once, not after every run tried
    again = run_cli("apply", manifest, api_key=emulator.api_key)
    assert again.returncode == 0, again.stderr
    assert emulator.stats()["runs_created_by_name"] == {f"s-s{i}": 1 for i in range(10)}


def test_wrong_api_key_stops_the_batch(tmp_path: Path, emulator: Any) -> None:
    for i in range(6):
        write_json(tmp_path / "in" / f"s{i}.json", {"i": i})
    manifest = write_manifest(
        tmp_path, emulator.api_url, [{"name": "s-{stem}", "input": "in/*.json"}], concurrency=2
    )
    result = run_cli("apply", manifest, api_key="wrong-key")
    assert result.returncode == 1
    assert "401" in result.stdout and "check the API key" in result.stdout
    assert "wrong-key" not in result.stdout + result.stderr
    stats = emulator.stats()
    assert stats["api_auth_failures"] <= 2  # one per worker at most, no retries
    assert stats["runs_created"] == 0


# -- row 6: refused connections, per-run deadline -----------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_connection_refused_is_retried_until_the_service_is_up(
    tmp_path: Path, emulator_process: Any
) -> None:
    port = free_port()
    manifest, expected = one_run(tmp_path, f"http://127.0.0.1:{port}")
    env = cli_env("k-0123456789")
    proc = popen_cli("apply", manifest, env=env)
    try:
        time.sleep(1.5)  # the first attempts find nothing listening
        assert proc.poll() is None, "gave up on the first refused connection"
        emu = emulator_process(api_key="k-0123456789", extra_args=["--port", str(port)])
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert emu.stats()["runs_created_by_name"] == {"a": 1}
    assert (tmp_path / "out" / "a.json").read_bytes() == expected


def test_per_run_deadline_cancels_on_the_service(tmp_path: Path, emulator: Any) -> None:
    src = write_json(tmp_path / "a.json", {})
    manifest = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "a", "input": src.name, "timeout": "1s"}],
        app="sleep",
        defaults={"options": {"duration": 60}},
    )
    t0 = time.monotonic()
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert time.monotonic() - t0 < 20
    assert result.returncode == 1
    assert "timed out after 1s; canceled on the service" in result.stdout
    stats = emulator.stats()
    assert stats["requests_by_route"].get("cancel") == 1
    assert stats["runs_by_status"] == {"canceled": 1}


# -- row 7: upload URL expiry -------------------------------------------------------


def test_expired_upload_url_gets_a_new_one_and_restarts(tmp_path: Path, emulator: Any) -> None:
    big = big_json(tmp_path / "big.json", 5 * MIB + 100)
    manifest = write_manifest(tmp_path, emulator.api_url, [{"name": "big", "input": "big.json"}])
    emulator.set_faults(expire_uploads=1)
    result = run_cli("apply", manifest, "--json", api_key=emulator.api_key)
    assert result.returncode == 0, result.stderr
    stats = emulator.stats()
    assert stats["faults_injected"]["expired_upload_url"] == 1
    assert stats["faults_injected"]["expired_rejected"] == 1
    assert stats["requests_by_route"]["uploadurl"] == 2  # a new URL
    assert stats["requests_by_route"]["upload"] == 2
    assert any("upload URL expired" in (e.get("message") or "") for e in json_events(result.stdout))
    # The stored input is the whole file (restarted from byte 0, not resumed).
    assert (tmp_path / "out" / "big.json").read_bytes() == echo_output(big.read_bytes())
    assert stats["runs_created_by_name"] == {"big": 1}


def test_upload_url_expiring_mid_transfer_is_never_marked_uploaded(
    tmp_path: Path, emulator: Any
) -> None:
    big = big_json(tmp_path / "big.json", 5 * MIB + 100)
    manifest = write_manifest(tmp_path, emulator.api_url, [{"name": "big", "input": "big.json"}])
    # URLs live 1 s and storage takes 1.5 s to answer an upload: every URL is valid
    # when the PUT starts and expired when its body is in ("Request has expired").
    emulator.set_faults(upload_url_lifetime_s=1.0, storage_latency_s=1.5)
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 1
    assert "upload URL expired" in result.stdout
    rec = load_state(manifest)["big"]
    assert rec.phase == "uploading" and rec.upload_id is None  # never marked uploaded
    stats = emulator.stats()
    assert stats["runs_created"] == 0
    assert stats["faults_injected"] == {"expired_rejected": 3}  # 3 tries, 3 fresh URLs
    assert stats["requests_by_route"]["uploadurl"] == 3
    emulator.set_faults(upload_url_lifetime_s=None, storage_latency_s=0.0)
    again = run_cli("apply", manifest, api_key=emulator.api_key)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "out" / "big.json").read_bytes() == echo_output(big.read_bytes())
    assert emulator.stats()["runs_created_by_name"] == {"big": 1}


# -- row 8: cut transfers --------------------------------------------------------------


def seed_for(pattern: list[bool], rate: float) -> int:
    """A seed whose first draws hit (True) or miss the fault as `pattern` says."""
    for seed in range(1, 10_000):
        rng = random.Random(seed)
        if all((rng.random() < rate) == hit for hit in pattern):
            return seed
    raise AssertionError("no seed")


@pytest.mark.parametrize("knob", ["cut_download_rate", "cut_upload_rate"])
def test_cut_transfer_is_retried_and_destination_only_complete(
    tmp_path: Path, emulator_factory: Any, knob: str
) -> None:
    seed = seed_for([True, False], 0.5)
    emu = emulator_factory(seed=seed, faults={knob: 0.5})
    src = big_json(tmp_path / "big.json", 6 * MIB)
    manifest = write_manifest(
        tmp_path, emu.api_url, [{"name": "big", "input": "big.json"}], app="cat"
    )
    out = tmp_path / "out" / "big.json"
    expected = src.read_bytes()
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # the destination, whenever it exists, is the whole file
        while not stop.is_set():
            try:
                data = out.read_bytes()
            except FileNotFoundError:
                continue
            seen.append(len(data))
            assert data == expected

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_cli("apply", manifest, api_key=emu.api_key)
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    stats = emu.stats()
    kind = "cut_download" if knob == "cut_download_rate" else "cut_upload"
    route = "download" if kind == "cut_download" else "upload"
    assert stats["faults_injected"] == {kind: 1}
    assert stats["requests_by_route"][route] == 2  # retried from the start
    assert out.read_bytes() == expected
    assert seen and set(seen) == {len(expected)}
    assert leftovers(tmp_path) == []
    assert stats["runs_created_by_name"] == {"big": 1}


# -- row 9: size limits -------------------------------------------------------------------


def test_upload_limit_exact_passes_one_more_byte_refused_before_any_request(
    tmp_path: Path, emulator: Any
) -> None:
    limit = 10_000
    (tmp_path / "exact.csv").write_bytes(b"x" * limit)
    (tmp_path / "over.csv").write_bytes(b"x" * (limit + 1))
    ok = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "exact", "input": "exact.csv"}],
        limits={"upload_max_bytes": limit},
        name="ok.yaml",
    )
    result = run_cli("apply", ok, api_key=emulator.api_key)
    assert result.returncode == 0, result.stderr
    assert emulator.stats()["runs_created_by_name"] == {"exact": 1}
    emulator.reset_stats()
    over = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "over", "input": "over.csv"}],
        limits={"upload_max_bytes": limit},
        name="over.yaml",
    )
    refused = run_cli("apply", over, api_key=emulator.api_key)
    assert refused.returncode == 2
    assert "10,001 bytes" in refused.stderr and "upload" in refused.stderr
    assert emulator.stats()["requests_by_route"] == {}  # not one request


def test_direct_limit_boundary_end_to_end(tmp_path: Path, emulator: Any) -> None:
    limit = 5 * MIB
    exact = tmp_path / "exact.json"
    exact.write_text(json.dumps({"p": "x" * (limit - len('{"p":""}'))}, separators=(",", ":")))
    over = tmp_path / "over.json"
    over.write_text(json.dumps({"p": "x" * (limit + 1 - len('{"p":""}'))}, separators=(",", ":")))
    assert (exact.stat().st_size, over.stat().st_size) == (limit, limit + 1)
    manifest = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "exact", "input": "exact.json"}, {"name": "over", "input": "over.json"}],
    )
    plan = json.loads(run_cli("plan", manifest, "--json").stdout)
    assert {r["name"]: r["transport"] for r in plan["runs"]} == {
        "exact": "direct",
        "over": "upload",
    }
    result = run_cli("apply", manifest, api_key=emulator.api_key)
    assert result.returncode == 0, result.stderr
    stats = emulator.stats()
    assert stats["requests_by_route"]["upload"] == 1
    assert stats["runs_created_by_name"] == {"exact": 1, "over": 1}
    assert (tmp_path / "out" / "exact.json").read_bytes() == echo_output(exact.read_bytes())


# -- row 12: SIGINT -------------------------------------------------------------------------


def wait_created(emulator: Any, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while emulator.stats()["runs_created"] < n:
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize("signals", [1, 2])
def test_sigint_saves_state_exits_130_and_resumes(
    tmp_path: Path, emulator_factory: Any, signals: int
) -> None:
    emu = emulator_factory(capacity=10)
    manifest = sleep_batch(tmp_path, emu.api_url)
    proc = popen_cli("apply", manifest, env=cli_env(emu.api_key))
    try:
        wait_created(emu, 3)
        time.sleep(0.2)  # let the third run's id be recorded
        proc.send_signal(signal.SIGINT)
        if signals == 2:
            time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # 130, or (a second SIGINT landing while the interpreter shuts down, after the state
    # was saved and the result printed) killed by SIGINT, which a shell also reports as 130.
    assert proc.returncode in (130, -signal.SIGINT), err
    assert elapsed < 5  # does not wait for the 2-second runs
    state = load_state(manifest)
    submitted = {n: r.run_id for n, r in state.items() if r.run_id}
    assert emu.stats()["runs_created"] == 3
    if signals == 1:
        assert "Interrupted: state saved" in out
        assert "Still running on the service" in out
        for name, run_id in submitted.items():
            assert f"{name}: {run_id}" in out
    assert len(submitted) == 3  # every created run is in the state
    again = run_cli("apply", manifest, api_key=emu.api_key)
    assert again.returncode == 0, again.stderr
    stats = emu.stats()
    assert stats["runs_created_by_name"] == {f"s-s{i}": 1 for i in range(6)}
    final = load_state(manifest)
    for name, run_id in submitted.items():
        assert final[name].run_id == run_id  # resumed, not recreated


# -- row 13: disk full --------------------------------------------------------------------


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def test_disk_full_at_the_output_folder(tmp_path: Path, emulator_factory: Any) -> None:
    emu = emulator_factory(capacity=1)
    out = tmp_path / "out"
    mount_tmpfs(out, "1m")
    try:
        expected = {}
        for i in range(6):
            src = tmp_path / "in" / f"b{i}.csv"
            src.parent.mkdir(exist_ok=True)
            src.write_bytes(bytes([65 + i]) * 300_000)
            expected[f"r-b{i}"] = src.read_bytes()
        manifest = write_manifest(
            tmp_path,
            emu.api_url,
            [{"name": "r-{stem}", "input": "in/*.csv"}],
            app="cat",
            concurrency=1,
            transfers=1,
        )
        result = run_cli("apply", manifest, api_key=emu.api_key)
        assert result.returncode == 3, result.stdout + result.stderr
        assert f"no space left in {out}" in result.stdout
        assert "free some space and apply again" in result.stdout
        created = emu.stats()["runs_created"]
        assert created < 6  # stopped submitting
        finals = sorted(p.name for p in out.iterdir())
        assert all(not n.startswith(".") for n in finals), finals  # no temp left
        for name in finals:  # whatever is final is complete
            assert (out / name).read_bytes() == expected[Path(name).stem]
    finally:
        umount(out)
    # Space freed (the tmpfs is gone: plain disk below): apply again completes.
    again = run_cli("apply", manifest, api_key=emu.api_key)
    assert again.returncode == 0, again.stderr + again.stdout
    assert emu.stats()["runs_created_by_name"] == {n: 1 for n in expected}
    for name, data in expected.items():
        assert (out / f"{name}.json").read_bytes() == data


def test_disk_full_at_the_state_folder(tmp_path: Path, emulator: Any) -> None:
    folder = tmp_path / "state"
    mount_tmpfs(folder, "2m")
    state = folder / "s.db"
    try:
        manifest = sleep_batch(tmp_path, emulator.api_url, 8, duration=0.3, concurrency=2)
        proc = popen_cli("apply", manifest, "--state", state, env=cli_env(emulator.api_key))
        try:
            wait_created(emulator, 1)
            with open(folder / "filler", "wb") as f:  # fill the state's file system
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 3, out + err
        assert f"free space in {folder} and apply again" in out + err
        assert emulator.stats()["runs_created"] < 8  # stopped submitting
        (folder / "filler").unlink()
        again = run_cli("apply", manifest, "--state", state, api_key=emulator.api_key)
        assert again.returncode == 0, again.stderr + again.stdout
        assert emulator.stats()["runs_created_by_name"] == {f"s-s{i}": 1 for i in range(8)}
        assert leftovers(folder) == []
    finally:
        umount(folder)


# -- row 11 through the CLI (store-level cases: tests/test_state.py) -------------------------


@pytest.mark.parametrize("damage", ["garbage_header", "other_manifest"])
def test_unusable_state_is_refused_never_started_fresh(
    tmp_path: Path, emulator: Any, damage: str
) -> None:
    manifest, _ = one_run(tmp_path, emulator.api_url)
    assert run_cli("apply", manifest, api_key=emulator.api_key).returncode == 0
    state = tmp_path / "manifest.batchrun-state.db"
    args: tuple[str | Path, ...] = ("apply", manifest)
    if damage == "garbage_header":
        data = bytearray(state.read_bytes())
        data[:100] = random.Random(1).randbytes(100)
        state.write_bytes(bytes(data))
    else:  # the state of another manifest, passed with --state
        other = write_manifest(
            tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}], name="other.yaml"
        )
        args = ("apply", other, "--state", state)
    before = state.read_bytes()
    routes = emulator.stats()["requests_by_route"]
    result = run_cli(*args, api_key=emulator.api_key)
    assert result.returncode == 3, result.stderr
    assert result.stderr.startswith(f"batchrun: state file {state} ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert state.read_bytes() == before
    assert emulator.stats()["requests_by_route"] == routes  # nothing resubmitted
