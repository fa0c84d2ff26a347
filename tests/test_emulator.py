"""The emulator against the official nextmv SDK and raw HTTP (real loopback)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TEST_API_KEY, InProcessEmulator
from nextmv import PollingOptions, StatusV2
from nextmv.cloud import Application, Client

from batchrun.emulator import EmulatorConfig, parse_app_arg, start_emulator
from batchrun.errors import UsageError

FAST = PollingOptions(
    initial_delay=0.05, delay=0.05, max_delay=0.2, max_duration=60, max_tries=1000
)
MIB = 1024 * 1024


def sdk_app(emulator: InProcessEmulator, app_id: str) -> Application:
    client = Client(api_key=emulator.api_key, url=emulator.api_url)
    return Application(client=client, id=app_id)


def big_input(min_bytes: int) -> dict[str, Any]:
    blob = "x" * 1000
    n = min_bytes // 1000 + 10
    return {"items": [{"id": i, "blob": blob} for i in range(n)]}


def wait_status(emulator: InProcessEmulator, app: str, run_id: str, want: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.get(
            f"{emulator.api_url}/v1/applications/{app}/runs/{run_id}/metadata",
            headers=emulator.headers(),
        )
        r.raise_for_status()
        info: dict[str, Any] = r.json()
        if info["metadata"]["status_v2"] == want:
            return info
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} never reached {want}")


# -- the SDK as a client ----------------------------------------------------


def test_sdk_small_run_with_result(emulator: InProcessEmulator) -> None:
    app = sdk_app(emulator, "echo")
    run_id = app.new_run(
        input={"hello": "world"}, instance_id="latest", name="small", options={"k": "v"}
    )
    assert run_id.startswith("latest-")
    result = app.run_result_with_polling(run_id, polling_options=FAST)
    assert result.metadata.status_v2 == StatusV2.succeeded
    assert result.name == "small"
    assert result.output is not None
    assert result.output["input_bytes"] == len(b'{"hello":"world"}')
    assert result.output["options"] == {"k": "v"}
    assert emulator.stats()["runs_created_by_name"] == {"small": 1}


def test_sdk_knapsack_app_directory(emulator: InProcessEmulator) -> None:
    app = sdk_app(emulator, "knapsack")
    data = {
        "items": [
            {"id": "a", "value": 10, "weight": 5},
            {"id": "b", "value": 40, "weight": 4},
            {"id": "c", "value": 30, "weight": 6},
            {"id": "d", "value": 50, "weight": 3},
        ],
        "weight_capacity": 10,
    }
    run_id = app.new_run(input=data, options={"solve.duration": "5s"})
    result = app.run_result_with_polling(run_id, polling_options=FAST)
    assert result.metadata.status_v2 == StatusV2.succeeded
    assert result.output is not None
    assert result.output["solutions"][0]["value"] == 90
    assert result.output["statistics"]["result"]["custom"]["optimal"] is True
    assert result.metadata.statistics is not None


def test_sdk_large_input_takes_upload_path(emulator: InProcessEmulator) -> None:
    app = sdk_app(emulator, "echo")
    data = big_input(5 * MIB + 1)
    compact = json.dumps(data, separators=(",", ":")).encode()
    assert len(compact) > 5 * MIB
    run_id = app.new_run(input=data, name="big-in")
    result = app.run_result_with_polling(run_id, polling_options=FAST)
    assert result.output is not None and result.output["input_bytes"] == len(compact)
    stats = emulator.stats()
    assert stats["requests_by_route"]["uploadurl"] == 1
    assert stats["requests_by_route"]["upload"] == 1
    assert stats["bytes_uploaded"] == len(compact)


def test_sdk_large_output_through_format_url(emulator: InProcessEmulator) -> None:
    app = sdk_app(emulator, "cat")
    data = big_input(5 * MIB + 1)
    run_id = app.new_run(input=data)
    result = app.run_result_with_polling(run_id, polling_options=FAST)
    assert result.metadata.output_size > 5 * MIB
    assert result.output == data
    # Asked for inline, the service refuses a large output and says what to do.
    r = httpx.get(
        f"{emulator.api_url}/v1/applications/cat/runs/{run_id}", headers=emulator.headers()
    )
    assert r.status_code == 400 and "format=url" in r.json()["error"]
    stats = emulator.stats()
    assert stats["bytes_downloaded"] == result.metadata.output_size
    # The SDK replaces its headers for the presigned GET: no key reached storage.
    assert stats["storage_auth_headers"] == 0


def test_sdk_list_runs_paginates(emulator: InProcessEmulator) -> None:
    app = sdk_app(emulator, "echo")
    ids = [app.new_run(input={"i": i}, name=f"r{i}", description=f"d{i}") for i in range(55)]
    runs = app.list_runs()
    assert [r.id for r in runs] == list(reversed(ids))
    assert runs[0].name == "r54" and runs[0].description == "d54"
    assert emulator.stats()["requests_by_route"]["list"] == 2
    page = httpx.get(
        f"{emulator.api_url}/v1/applications/echo/runs",
        params={"pagereturn": "true"},
        headers=emulator.headers(),
    ).json()
    assert len(page["runs"]) == 50 and isinstance(page["next_page_token"], str)


def test_sdk_cancel_sleep_run(emulator: InProcessEmulator) -> None:
    app = sdk_app(emulator, "sleep")
    run_id = app.new_run(input={}, options={"duration": "30"})
    wait_status(emulator, "sleep", run_id, "running")
    app.cancel_run(run_id)
    info = app.run_information(run_id)
    assert info.metadata.status_v2 == StatusV2.canceled


def test_cancel_kills_the_process(emulator_factory: Any, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    script = tmp_path / "slow.py"
    script.write_text(
        "import time, pathlib, sys\n"
        f"time.sleep(3)\npathlib.Path({str(marker)!r}).write_text('late')\nprint('{{}}')\n"
    )
    import sys

    emu = emulator_factory(extra_apps=(("slow", f"{sys.executable} {script}"),))
    app = sdk_app(emu, "slow")
    run_id = app.new_run(input={})
    wait_status(emu, "slow", run_id, "running")
    time.sleep(0.3)
    app.cancel_run(run_id)
    wait_status(emu, "slow", run_id, "canceled")
    time.sleep(3.2)
    assert not marker.exists()


def test_sdk_failed_run(emulator: InProcessEmulator) -> None:
    app = sdk_app(emulator, "fail")
    run_id = app.new_run(input={"x": 1})
    result = app.run_result_with_polling(run_id, polling_options=FAST)
    assert result.metadata.status_v2 == StatusV2.failed
    assert "boom: bad input" in result.metadata.error
    assert result.error_log is not None and "boom" in (result.error_log.stderr or "")
    assert result.output is None


# -- raw HTTP ---------------------------------------------------------------


def test_401_without_key(emulator: InProcessEmulator) -> None:
    url = f"{emulator.api_url}/v1/applications/echo/runs"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "error" in r.json()
    assert httpx.get(url, headers=emulator.headers()).status_code == 200
    assert emulator.stats()["api_auth_failures"] == 2


def test_no_auth_in_embedded_mode(emulator_factory: Any) -> None:
    emu = emulator_factory(api_key=None)
    r = httpx.post(f"{emu.api_url}/v1/applications/echo/runs", json={"input": {}})
    assert r.status_code == 200


def test_create_validation(emulator: InProcessEmulator) -> None:
    url = f"{emulator.api_url}/v1/applications/echo/runs"
    h = emulator.headers()
    assert httpx.post(url, json={}, headers=h).status_code == 400
    assert httpx.post(url, json={"input": {}, "upload_id": "x"}, headers=h).status_code == 400
    r = httpx.post(url, json={"input": {}, "options": {"a": 1}}, headers=h)
    assert r.status_code == 400 and "string" in r.json()["error"]
    assert httpx.post(url, json={"upload_id": "nope"}, headers=h).status_code == 400
    up = httpx.post(f"{url}/uploadurl", headers=h).json()
    r = httpx.post(url, json={"upload_id": up["upload_id"]}, headers=h)
    assert r.status_code == 400 and "PUT" in r.json()["error"]
    r = httpx.post(f"{emulator.api_url}/v1/applications/nope/runs", json={"input": {}}, headers=h)
    assert r.status_code == 404
    r = httpx.get(f"{url}/latest-missing/metadata", headers=h)
    assert r.status_code == 404


def test_inline_input_limit_is_the_sdk_rule(emulator: InProcessEmulator) -> None:
    url = f"{emulator.api_url}/v1/applications/echo/runs"
    h = emulator.headers()
    overhead = len('{"s":""}')
    at_limit = {"s": "a" * (5 * MIB - overhead)}
    r = httpx.post(url, json={"input": at_limit}, headers=h, timeout=30)
    assert r.status_code == 200
    over = {"s": "a" * (5 * MIB - overhead + 1)}
    r = httpx.post(url, json={"input": over}, headers=h, timeout=30)
    assert r.status_code == 413 and "upload" in r.json()["error"]
    assert emulator.stats()["runs_created"] == 1


def test_upload_url_on_separate_origin_and_signature(emulator: InProcessEmulator) -> None:
    h = emulator.headers()
    up = httpx.post(f"{emulator.api_url}/v1/applications/echo/runs/uploadurl", headers=h).json()
    url = up["upload_url"]
    assert url.startswith(emulator.storage_url) and "sig=" in url and "expires=" in url
    assert emulator.storage_url != emulator.api_url
    bad = url.replace("sig=", "sig=0")
    r = httpx.put(bad, content=b"{}")
    assert r.status_code == 403 and "expired" not in r.text
    r = httpx.put(url, content=b'{"a": 1}')
    assert r.status_code == 200 and r.content == b""
    assert emulator.stats()["storage_auth_headers"] == 0
    up2 = httpx.post(f"{emulator.api_url}/v1/applications/echo/runs/uploadurl", headers=h).json()
    assert httpx.put(up2["upload_url"], content=b"{}", headers=h).status_code == 200
    assert emulator.stats()["storage_auth_headers"] == 1
    run = httpx.post(
        f"{emulator.api_url}/v1/applications/echo/runs",
        json={"upload_id": up["upload_id"]},
        headers=h,
    ).json()
    info = wait_status(emulator, "echo", run["run_id"], "succeeded")
    assert info["metadata"]["input_size"] == 8


def test_capacity_queues_fifo(emulator_factory: Any) -> None:
    emu = emulator_factory(capacity=2)
    h = emu.headers()
    url = f"{emu.api_url}/v1/applications/sleep/runs"
    ids = [
        httpx.post(url, json={"input": {}, "options": {"duration": "0.4"}}, headers=h).json()[
            "run_id"
        ]
        for _ in range(5)
    ]
    statuses = [
        httpx.get(f"{url}/{i}/metadata", headers=h).json()["metadata"]["status_v2"] for i in ids
    ]
    assert statuses == ["running", "running", "queued", "queued", "queued"]
    for i in ids:
        wait_status(emu, "sleep", i, "succeeded")
    starts = [
        httpx.get(f"{url}/{i}/metadata", headers=h).json()["metadata"]["initiated_at"] for i in ids
    ]
    assert starts == sorted(starts)
    assert emu.stats()["peak_running"] == 2


def test_non_json_output_is_text_and_needs_url(emulator_factory: Any) -> None:
    import sys

    emu = emulator_factory(extra_apps=(("hello", f"{sys.executable} -c \"print('hi')\""),))
    h = emu.headers()
    base = f"{emu.api_url}/v1/applications/hello/runs"
    run_id = httpx.post(base, json={"input": {}}, headers=h).json()["run_id"]
    info = wait_status(emu, "hello", run_id, "succeeded")
    assert info["metadata"]["format"]["output"]["type"] == "text"
    assert httpx.get(f"{base}/{run_id}", headers=h).status_code == 400
    link = httpx.get(f"{base}/{run_id}", params={"format": "url"}, headers=h).json()
    assert httpx.get(link["output"]["url"]).content == b"hi\n"


def test_parse_app_arg() -> None:
    assert parse_app_arg("knap=examples/knapsack") == ("knap", "examples/knapsack")
    assert parse_app_arg("x=python -m foo -a=b") == ("x", "python -m foo -a=b")
    for bad in ("noequals", "=cmd", "id=", "bad id=cmd"):
        with pytest.raises(UsageError):
            parse_app_arg(bad)


def test_bad_app_spec_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "noyaml").mkdir()
    with pytest.raises(UsageError):
        start_emulator(EmulatorConfig(api_key=None, apps=(("a", str(tmp_path / "noyaml")),)))
    with pytest.raises(UsageError):
        start_emulator(EmulatorConfig(api_key=None, apps=(("a", "builtin:nope"),)))


def test_separate_process(emulator_process: Any) -> None:
    proc = emulator_process(capacity=1, faults={"fail_next": {"cancel": 1}, "retry_after_s": 2})
    app = sdk_app(proc, "echo")
    run_id = app.new_run(input={"p": 1}, name="in-proc")
    result = app.run_result_with_polling(run_id, polling_options=FAST)
    assert result.metadata.status_v2 == StatusV2.succeeded
    assert proc.stats()["runs_created_by_name"] == {"in-proc": 1}
    r = httpx.patch(
        f"{proc.api_url}/v1/applications/echo/runs/{run_id}/cancel", headers=proc.headers()
    )
    assert r.status_code == 503  # the fault given on the command line
    proc.set_faults(fail_next={"list": 1})  # replaces the pending fail_next counts
    assert (
        httpx.get(f"{proc.api_url}/v1/applications/echo/runs", headers=proc.headers()).status_code
        == 503
    )
    proc.terminate()
    assert proc.proc.returncode == 0


def test_examples_make_inputs_and_app(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import REPO_ROOT

    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "make_inputs.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    assert time.monotonic() - t0 < 5
    big = tmp_path / "big-01.json"
    assert big.stat().st_size > 5 * MIB
    small = sorted(tmp_path.glob("small-*.json"))
    assert len(small) >= 3
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "knapsack" / "main.py")],
        stdin=big.open("rb"),
        capture_output=True,
        check=True,
    ).stdout
    assert len(out) > 5 * MIB
    assert json.loads(out)["solutions"][0]["value"] > 0
    _ = TEST_API_KEY


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.slow
def test_400mb_streamed_put_keeps_server_memory_flat(emulator_process: Any) -> None:
    """A 400 MB upload must not grow the emulator's peak RSS by more than 100 MB."""
    proc = emulator_process()
    h = proc.headers()
    # Warm up every code path first, so idle means "has served an upload and a run".
    app = sdk_app(proc, "echo")
    app.run_result_with_polling(app.new_run(input={"warm": 1}), polling_options=FAST)
    up = httpx.post(f"{proc.api_url}/v1/applications/echo/runs/uploadurl", headers=h).json()
    httpx.put(up["upload_url"], content=b"{}").raise_for_status()
    idle_rss = _proc_kib(proc.pid, "VmRSS")
    idle_hwm = _proc_kib(proc.pid, "VmHWM")

    total = 400 * 1000 * 1000
    chunk = b"7" * (1024 * 1024)

    def body() -> Iterator[bytes]:
        sent = 0
        while sent < total:
            piece = chunk[: min(len(chunk), total - sent)]
            sent += len(piece)
            yield piece

    up = httpx.post(f"{proc.api_url}/v1/applications/echo/runs/uploadurl", headers=h).json()
    r = httpx.put(
        up["upload_url"], content=body(), headers={"Content-Length": str(total)}, timeout=120
    )
    assert r.status_code == 200
    peak = _proc_kib(proc.pid, "VmHWM")
    growth_mb = (peak - max(idle_rss, 0)) / 1024
    print(
        f"emulator idle RSS {idle_rss} KiB (HWM {idle_hwm}), peak after 400 MB PUT {peak} KiB, "
        f"growth {growth_mb:.1f} MiB"
    )
    assert proc.stats()["bytes_uploaded"] == total + 2
    assert peak - idle_rss < 100 * 1024
