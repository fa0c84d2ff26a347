"""`batchrun apply` end to end: the real CLI in a subprocess, the real emulator over HTTP."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from tests.apply_helpers import (
    big_json,
    cli_env,
    popen_cli,
    run_cli,
    sleep_batch,
    write_json,
    write_manifest,
)

MIB = 1024 * 1024


def compact(path: Path) -> bytes:
    return json.dumps(json.loads(path.read_bytes()), separators=(",", ":")).encode()


def test_both_transports_outputs_byte_identical(tmp_path: Path, emulator: Any) -> None:
    small = write_json(tmp_path / "in" / "small.json", {"items": [1, 2, 3], "name": "small"})
    big = big_json(tmp_path / "in" / "big.json", 5 * MIB + 100)
    text = tmp_path / "in" / "table.csv"
    text.write_text("a,b\n1,2\n")
    m = write_manifest(
        tmp_path,
        emulator.api_url,
        [
            {"name": "small", "input": "in/small.json"},
            {"name": "big", "input": "in/big.json"},
            {"name": "csv", "input": "in/table.csv"},
        ],
        app="cat",
        defaults={"output": "out/{name}.out"},
    )
    plan = run_cli("plan", m, "--json", api_key=emulator.api_key)
    assert plan.returncode == 0, plan.stderr
    transports = {r["name"]: r["transport"] for r in json.loads(plan.stdout)["runs"]}
    assert transports == {"small": "direct", "big": "upload", "csv": "upload"}

    result = run_cli("apply", m, api_key=emulator.api_key)
    assert result.returncode == 0, result.stderr + result.stdout
    assert (tmp_path / "out" / "small.out").read_bytes() == compact(small)
    assert (tmp_path / "out" / "big.out").read_bytes() == big.read_bytes()
    assert (tmp_path / "out" / "table.out").exists() is False
    assert (tmp_path / "out" / "csv.out").read_bytes() == text.read_bytes()
    stats = emulator.stats()
    assert stats["runs_created_by_name"] == {"small": 1, "big": 1, "csv": 1}
    assert stats["storage_auth_headers"] == 0


def test_second_apply_does_nothing(tmp_path: Path, emulator: Any) -> None:
    for i in range(3):
        write_json(tmp_path / "in" / f"r{i}.json", {"i": i})
    m = write_manifest(tmp_path, emulator.api_url, [{"name": "r-{stem}", "input": "in/*.json"}])
    first = run_cli("apply", m, api_key=emulator.api_key)
    assert first.returncode == 0, first.stderr
    before = emulator.stats()
    assert before["runs_created"] == 3
    second = run_cli("apply", m, api_key=emulator.api_key)
    assert second.returncode == 0, second.stderr
    assert "3 unchanged" in second.stdout
    after = emulator.stats()
    assert after["requests_by_route"] == before["requests_by_route"]
    plan = run_cli("plan", m, "--detailed-exitcode", api_key=emulator.api_key)
    assert plan.returncode == 0, plan.stdout + plan.stderr


def test_changed_input_is_a_rerun_and_keeps_history(tmp_path: Path, emulator: Any) -> None:
    src = write_json(tmp_path / "a.json", {"v": 1})
    m = write_manifest(tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}])
    assert run_cli("apply", m, api_key=emulator.api_key).returncode == 0
    write_json(src, {"v": 2})
    plan = run_cli("plan", m, "--json")
    assert json.loads(plan.stdout)["runs"][0]["action"] == "rerun"
    assert run_cli("apply", m, api_key=emulator.api_key).returncode == 0
    out = json.loads((tmp_path / "out" / "a.json").read_text())
    assert out["input_sha256"] == hashlib.sha256(compact(src)).hexdigest()
    status = json.loads(run_cli("status", m, "--json").stdout)["runs"][0]
    assert status["phase"] == "collected"
    assert len(status["history"]) == 1 and status["history"][0] != status["run_id"]
    assert emulator.stats()["runs_created_by_name"] == {"a": 2}


def test_failed_run_exit_1_then_retry(tmp_path: Path, emulator: Any) -> None:
    write_json(tmp_path / "ok.json", {})
    write_json(tmp_path / "bad.json", {})
    m = write_manifest(
        tmp_path,
        emulator.api_url,
        [
            {"name": "ok", "input": "ok.json"},
            {"name": "bad", "input": "bad.json", "app": "fail"},
        ],
    )
    result = run_cli("apply", m, api_key=emulator.api_key)
    assert result.returncode == 1, result.stderr
    assert "bad: boom: bad input" in result.stdout.replace("✗ ", "")
    plan = json.loads(run_cli("plan", m, "--json").stdout)
    assert {r["name"]: r["action"] for r in plan["runs"]} == {"ok": "unchanged", "bad": "retry"}
    again = run_cli("apply", m, api_key=emulator.api_key)
    assert again.returncode == 1
    assert emulator.stats()["runs_created_by_name"] == {"ok": 1, "bad": 2}


def test_concurrency_bound_never_exceeded(tmp_path: Path, emulator_factory: Any) -> None:
    emu = emulator_factory(capacity=50)
    m = sleep_batch(tmp_path, emu.api_url, 12, duration=0.3, concurrency=3)
    result = run_cli("apply", m, api_key=emu.api_key)
    assert result.returncode == 0, result.stderr
    stats = emu.stats()
    assert stats["runs_created"] == 12
    assert 1 <= stats["peak_running"] <= 3


def test_second_apply_is_refused_while_the_first_holds_the_lock(
    tmp_path: Path, emulator: Any
) -> None:
    write_json(tmp_path / "a.json", {})
    m = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "a", "input": "a.json"}],
        app="sleep",
        defaults={"options": {"duration": 3}},
    )
    first = popen_cli("apply", m, env=cli_env(emulator.api_key))
    try:
        deadline = time.monotonic() + 30
        while emulator.stats()["runs_created"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_cli("apply", m, api_key=emulator.api_key)
        assert second.returncode == 3
        assert f"locked by pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.wait(timeout=60)
    assert first.returncode == 0
    assert emulator.stats()["runs_created"] == 1


def test_mixed_faults_every_run_succeeds_no_duplicates(
    tmp_path: Path, emulator_factory: Any
) -> None:
    emu = emulator_factory(
        seed=7,
        faults={
            "error_rate": 0.1,
            "lost_create_rate": 0.1,
            "lost_create_mode": "alternate",
            "rate_429": 0.05,
            "reset_rate": 0.05,
            "cut_download_rate": 0.1,
        },
    )
    for i in range(30):
        write_json(tmp_path / "in" / f"f{i:02d}.json", {"i": i})
    m = write_manifest(
        tmp_path, emu.api_url, [{"name": "f-{stem}", "input": "in/*.json"}], concurrency=8
    )
    result = run_cli("apply", m, api_key=emu.api_key)
    assert result.returncode == 0, result.stderr + result.stdout
    stats = emu.stats()
    assert stats["runs_created_by_name"] == {f"f-f{i:02d}": 1 for i in range(30)}
    injected = stats["faults_injected"]
    assert sum(injected.values()) > 0, injected
    for i in range(30):
        assert json.loads((tmp_path / "out" / f"f-f{i:02d}.json").read_text())["input_bytes"] > 0


def test_secrets_absent_from_state_logs_and_events(tmp_path: Path, emulator: Any) -> None:
    write_json(tmp_path / "small.json", {"a": 1})
    big_json(tmp_path / "big.json", 5 * MIB + 10)
    m = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "small", "input": "small.json"}, {"name": "big", "input": "big.json"}],
    )
    result = run_cli("--log-level", "debug", "apply", m, "--json", api_key=emulator.api_key)
    assert result.returncode == 0, result.stderr
    assert "HTTP Request" in result.stderr  # debug logging was really on
    state = next(tmp_path.glob("*.batchrun-state.db"))
    dump = "\n".join(sqlite3.connect(state).iterdump())
    for text in (result.stdout, result.stderr, dump):
        assert emulator.api_key not in text
        assert "sig=" not in text
    assert state.stat().st_mode & 0o777 == 0o600
