"""The CLI as a person uses it: the quickstart, validate, plan, status, cancel,
timeouts, --fail-fast, memory on a large upload. Real subprocesses, real emulator."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.apply_helpers import cli_env, popen_cli, run_cli, write_json, write_manifest

REPO = Path(__file__).resolve().parent.parent


def test_quickstart_on_the_embedded_emulator(tmp_path: Path) -> None:
    """The README's first command, in a copy of examples/: both transports, then a no-op."""
    work = tmp_path / "examples"
    shutil.copytree(REPO / "examples" / "knapsack", work / "knapsack")
    shutil.copy(REPO / "examples" / "knapsack.yaml", work / "knapsack.yaml")
    gen = subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_inputs.py"), "--out", str(work / "inputs")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gen.returncode == 0, gen.stderr
    plan = run_cli("plan", work / "knapsack.yaml", "--json")
    assert plan.returncode == 0, plan.stderr
    transports = {r["transport"] for r in json.loads(plan.stdout)["runs"]}
    assert transports == {"direct", "upload"}

    first = run_cli("apply", work / "knapsack.yaml", env=cli_env(None))
    assert first.returncode == 0, first.stderr + first.stdout
    assert "5 collected" in first.stdout
    for out in (work / "out").glob("*.json"):
        solution = json.loads(out.read_text())
        assert solution["solutions"][0]["value"] > 0
    assert (work / "out" / "big.json").stat().st_size > 5 * 1024 * 1024

    second = run_cli("apply", work / "knapsack.yaml", env=cli_env(None))
    assert second.returncode == 0
    assert "5 unchanged" in second.stdout and "0 API requests" in second.stdout


def test_validate_reports_every_problem_with_location(tmp_path: Path) -> None:
    m = tmp_path / "m.yaml"
    m.write_text("version: 1\napp: a\nruns:\n  - name: x\n    input: nope.json\n    optons: {}\n")
    result = run_cli("validate", m)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any(":5:" in ln and "nope.json" in ln for ln in lines), lines
    assert any(":6:5:" in ln and "did you mean 'options'" in ln for ln in lines), lines
    assert "Traceback" not in result.stderr


def test_validate_ok_and_schema_is_json(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {})
    m = write_manifest(tmp_path, "embedded", [{"name": "a", "input": "a.json"}])
    ok = run_cli("validate", m)
    assert ok.returncode == 0 and "valid (1 runs)" in ok.stdout
    schema = json.loads(run_cli("schema").stdout)
    assert schema["$schema"].endswith("2020-12/schema")


def test_plan_detailed_exitcode(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {})
    m = write_manifest(tmp_path, "embedded", [{"name": "a", "input": "a.json"}])
    assert run_cli("plan", m, "--detailed-exitcode").returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\n")
    assert run_cli("plan", bad, "--detailed-exitcode").returncode == 1


def test_missing_api_key_is_one_clear_line(tmp_path: Path, emulator: Any) -> None:
    write_json(tmp_path / "a.json", {})
    m = write_manifest(tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}])
    result = run_cli("apply", m, api_key=None)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "batchrun: BATCHRUN_TEST_KEY is not set: export your Nextmv API key in it"
        " (or use `endpoint: embedded` to try the manifest offline)"
    )
    assert emulator.stats()["runs_created"] == 0


def test_status_reads_the_state_without_network(tmp_path: Path, emulator: Any) -> None:
    write_json(tmp_path / "a.json", {})
    m = write_manifest(tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}])
    assert run_cli("apply", m, api_key=emulator.api_key).returncode == 0
    emulator.stop()  # no service any more: status must not need it
    rows = json.loads(run_cli("status", m, "--json").stdout)["runs"]
    assert rows[0]["name"] == "a" and rows[0]["phase"] == "collected"
    assert rows[0]["output"] == str(tmp_path / "out" / "a.json")
    text = run_cli("status", m).stdout
    assert "collected" in text


def test_run_timeout_cancels_on_the_service(tmp_path: Path, emulator: Any) -> None:
    write_json(tmp_path / "a.json", {})
    m = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "slow", "input": "a.json", "timeout": "1s"}],
        app="sleep",
        defaults={"options": {"duration": 30}},
    )
    started = time.monotonic()
    result = run_cli("apply", m, api_key=emulator.api_key)
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    assert "timed out after 1s; canceled on the service" in result.stdout
    assert emulator.stats()["runs_by_status"].get("canceled") == 1


def test_fail_fast_starts_nothing_new(tmp_path: Path, emulator: Any) -> None:
    for i in range(4):
        write_json(tmp_path / f"r{i}.json", {"i": i})
    runs = [{"name": "bad", "input": "r0.json", "app": "fail"}] + [
        {"name": f"ok{i}", "input": f"r{i}.json"} for i in range(1, 4)
    ]
    m = write_manifest(tmp_path, emulator.api_url, runs, concurrency=1)
    result = run_cli("apply", m, "--fail-fast", api_key=emulator.api_key)
    assert result.returncode == 1
    assert emulator.stats()["runs_created_by_name"] == {"bad": 1}


def test_cancel_stops_runs_left_in_flight(tmp_path: Path, emulator: Any) -> None:
    write_json(tmp_path / "a.json", {})
    m = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "long", "input": "a.json"}],
        app="sleep",
        defaults={"options": {"duration": 60}},
    )
    env = cli_env(emulator.api_key)
    proc = popen_cli("apply", m, "--plain", env=env)
    deadline = time.monotonic() + 30
    while emulator.stats()["runs_created"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let the run id reach the state
    proc.send_signal(2)  # SIGINT: save state and stop, leaving the run on the service
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    status = json.loads(run_cli("status", m, "--json").stdout)["runs"][0]
    assert status["phase"] == "submitted"
    result = run_cli("cancel", m, api_key=emulator.api_key)
    assert result.returncode == 0, result.stderr
    assert f"canceled long: {status['run_id']}" in result.stdout
    assert emulator.stats()["runs_by_status"].get("canceled") == 1
    assert json.loads(run_cli("status", m, "--json").stdout)["runs"][0]["phase"] == "canceled"


def test_unlock_with_no_lock_held(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {})
    m = write_manifest(tmp_path, "embedded", [{"name": "a", "input": "a.json"}])
    result = run_cli("unlock", m)
    assert result.returncode == 0
    assert result.stdout.strip() == "no lock to remove"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_large_upload_keeps_apply_memory_flat(tmp_path: Path, emulator: Any) -> None:
    """A 300 MB input: the apply process's peak RSS stays under 100 MB."""
    size = 300 * 1000 * 1000
    big = tmp_path / "big.csv"
    with big.open("wb") as f:
        chunk = b"0123456789abcdef" * 65536
        while f.tell() < size:
            f.write(chunk[: size - f.tell()])
    m = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "big", "input": "big.csv"}],
        limits={"download_max_bytes": 100_000_000},
    )
    # VmHWM, not ru_maxrss: after a vfork+exec, Linux folds the parent's peak
    # (this pytest process, emulator included) into the child's ru_maxrss.
    code = (
        "import runpy, sys\n"
        "sys.argv = ['batchrun', 'apply', sys.argv[1], '--plain']\n"
        "try:\n"
        "    runpy.run_module('batchrun', run_name='__main__')\n"
        "finally:\n"
        "    status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "    print('MAXRSS_KB', status.split()[0], file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(m)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(cli_env(emulator.api_key), PYTHONPATH=str(REPO)),
    )
    # The echo app's output is small; the point is the 300 MB going up.
    assert result.returncode == 0, result.stderr[-2000:]
    rss_kb = int(result.stderr.rsplit("MAXRSS_KB", 1)[1].split()[0])
    print(f"apply peak RSS for a 300 MB upload: {rss_kb / 1024:.1f} MB")
    assert rss_kb < 100 * 1024, f"peak RSS {rss_kb / 1024:.0f} MB"
    out = json.loads((tmp_path / "out" / "big.json").read_text())
    assert out["input_bytes"] == size
    assert os.path.getsize(big) == size


def test_input_vanishing_after_validation(tmp_path: Path, emulator: Any) -> None:
    """An input deleted after validation: a clear error at planning, and a run-level
    `unfinished` (not a crash) when it goes between planning and sending."""
    import asyncio

    from batchrun import commands
    from batchrun.errors import UsageError

    write_json(tmp_path / "a.json", {"a": 1})
    b = write_json(tmp_path / "b.json", {"b": 2})
    m = write_manifest(
        tmp_path,
        emulator.api_url,
        [{"name": "a", "input": "a.json"}, {"name": "b", "input": "b.json"}],
    )
    manifest = commands.validate(m)
    b.unlink()
    with pytest.raises(UsageError, match=r"cannot read input .*b\.json"):
        commands.plan_manifest(manifest, commands.Overrides())
    write_json(b, {"b": 2})
    os.environ["BATCHRUN_TEST_KEY"] = emulator.api_key
    try:
        result = asyncio.run(
            commands.apply_async(manifest, commands.Overrides(), on_engine=lambda _: b.unlink())
        )
    finally:
        del os.environ["BATCHRUN_TEST_KEY"]
    assert result.outcomes == {"a": "collected", "b": "unfinished"}
    assert "cannot read input b.json" in result.errors["b"]
    assert emulator.stats()["runs_created_by_name"] == {"a": 1}
