"""Each emulator fault knob, observed from a raw HTTP client (real loopback)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest
from conftest import InProcessEmulator


def runs_url(emu: InProcessEmulator, app: str = "echo") -> str:
    return f"{emu.api_url}/v1/applications/{app}/runs"


def create(emu: InProcessEmulator, **body: Any) -> httpx.Response:
    body.setdefault("input", {"x": 1})
    return httpx.post(runs_url(emu), json=body, headers=emu.headers(), timeout=10)


def wait_final(emu: InProcessEmulator, run_id: str, app: str = "echo") -> dict[str, Any]:
    for _ in range(1000):
        info: dict[str, Any] = httpx.get(
            f"{runs_url(emu, app)}/{run_id}", headers=emu.headers()
        ).json()
        if info["metadata"]["status_v2"] in ("succeeded", "failed", "canceled"):
            return info
        time.sleep(0.02)
    raise AssertionError("run never finished")


def test_error_rate_per_route_class(emulator: InProcessEmulator) -> None:
    emulator.set_faults(error_rate=1.0, error_routes=["list"])
    statuses = {
        httpx.get(runs_url(emulator), headers=emulator.headers()).status_code for _ in range(30)
    }
    assert statuses <= {502, 503, 504} and len(statuses) >= 2
    assert create(emulator).status_code == 200  # other routes untouched
    injected = emulator.stats()["faults_injected"]
    assert sum(injected.get(str(s), 0) for s in (502, 503, 504)) == 30


def test_faults_are_deterministic_given_seed(emulator_factory: Any) -> None:
    def sequence(seed: int) -> list[int]:
        emu = emulator_factory(seed=seed, faults={"error_rate": 0.5})
        return [httpx.get(runs_url(emu), headers=emu.headers()).status_code for _ in range(40)]

    first, second, other = sequence(7), sequence(7), sequence(8)
    assert first == second
    assert first != other
    assert 200 in first and any(s >= 500 for s in first)


def test_429_with_retry_after_seconds_and_http_date(emulator: InProcessEmulator) -> None:
    emulator.set_faults(rate_429=1.0, retry_after_s=3, retry_after_format="alternate")
    a = httpx.get(runs_url(emulator), headers=emulator.headers())
    b = httpx.get(runs_url(emulator), headers=emulator.headers())
    assert a.status_code == b.status_code == 429
    assert a.headers["Retry-After"] == "3"
    when = parsedate_to_datetime(b.headers["Retry-After"])
    assert when.timestamp() >= time.time() + 2.5
    emulator.set_faults(retry_after_format="date")
    c = httpx.get(runs_url(emulator), headers=emulator.headers())
    parsedate_to_datetime(c.headers["Retry-After"])
    assert emulator.stats()["responses_429"] == 3


def test_rate_limits_creations_per_second(emulator_factory: Any) -> None:
    emu = emulator_factory(rate_limits=True, faults={"retry_after_format": "seconds"})
    codes = [create(emu).status_code for _ in range(7)]
    assert codes[:5] == [200] * 5 and codes[5] == 429
    r = create(emu)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    time.sleep(1.05)
    assert create(emu).status_code == 200
    assert emu.stats()["runs_created"] == 6


def test_rate_limits_results_per_10s(emulator_factory: Any) -> None:
    emu = emulator_factory(rate_limits=True, results_per_10s=5)
    run_id = create(emu).json()["run_id"]
    codes = [
        httpx.get(f"{runs_url(emu)}/{run_id}/metadata", headers=emu.headers()).status_code
        for _ in range(6)
    ]
    assert codes == [200] * 5 + [429]
    assert httpx.get(runs_url(emu), headers=emu.headers()).status_code == 200  # list: no limit


def test_latency(emulator: InProcessEmulator) -> None:
    emulator.set_faults(latency_s=0.3)
    t0 = time.monotonic()
    assert httpx.get(runs_url(emulator), headers=emulator.headers()).status_code == 200
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    emulator.stats()  # introspection is never slowed
    assert time.monotonic() - t0 < 0.3


def test_connection_reset(emulator: InProcessEmulator) -> None:
    emulator.set_faults(reset_rate=1.0, error_routes=["metadata"])
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.get(f"{runs_url(emulator)}/latest-x/metadata", headers=emulator.headers())
    assert emulator.stats()["faults_injected"]["reset"] == 1
    # The server is fine afterwards.
    assert httpx.get(runs_url(emulator), headers=emulator.headers()).status_code == 200


def test_lost_create_502_run_exists(emulator: InProcessEmulator) -> None:
    emulator.set_faults(lose_next_creates=1)
    r = create(emulator, name="entry-1", description="key:abc")
    assert r.status_code == 502
    stats = emulator.stats()
    assert stats["runs_created_by_name"] == {"entry-1": 1}
    assert stats["runs_created_by_description"] == {"key:abc": 1}
    listed = httpx.get(runs_url(emulator), headers=emulator.headers()).json()["runs"]
    assert [run["description"] for run in listed] == ["key:abc"]
    assert create(emulator).status_code == 200  # only the next one was lost


def test_lost_create_reset_run_exists(emulator: InProcessEmulator) -> None:
    emulator.set_faults(lost_create_rate=1.0, lost_create_mode="reset")
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        create(emulator, name="entry-2")
    assert emulator.stats()["runs_created_by_name"] == {"entry-2": 1}
    assert emulator.stats()["faults_injected"]["lost_create_reset"] == 1


def test_expired_upload_url(emulator: InProcessEmulator) -> None:
    emulator.set_faults(expire_uploads=1)
    h = emulator.headers()
    first = httpx.post(f"{runs_url(emulator)}/uploadurl", headers=h).json()
    r = httpx.put(first["upload_url"], content=b"{}" * 1000)
    assert r.status_code == 403 and "Request has expired" in r.text
    second = httpx.post(f"{runs_url(emulator)}/uploadurl", headers=h).json()
    assert httpx.put(second["upload_url"], content=b"{}").status_code == 200
    r = create(emulator, input=None, upload_id=first["upload_id"])
    assert r.status_code == 400


def test_upload_url_expires_mid_transfer(emulator: InProcessEmulator) -> None:
    emulator.set_faults(upload_url_lifetime_s=1.0)
    up = httpx.post(f"{runs_url(emulator)}/uploadurl", headers=emulator.headers()).json()

    def slow() -> Iterator[bytes]:
        yield b'{"a":'
        time.sleep(2.1)
        yield b"1}"

    r = httpx.put(up["upload_url"], content=slow(), timeout=10)
    assert r.status_code == 403 and "Request has expired" in r.text
    assert create(emulator, input=None, upload_id=up["upload_id"]).status_code == 400


def test_cut_download(emulator: InProcessEmulator) -> None:
    run_id = create(emulator, input={"pad": "y" * 300_000}).json()["run_id"]
    wait_final(emulator, run_id)
    r = httpx.get(
        f"{runs_url(emulator)}/{run_id}", params={"format": "url"}, headers=emulator.headers()
    )
    url = r.json()["output"]["url"]
    assert url.startswith(emulator.storage_url) and "sig=" in url
    full = httpx.get(url).content
    emulator.set_faults(cut_download_rate=1.0)
    got = 0
    declared = -1
    with pytest.raises(httpx.HTTPError), httpx.stream("GET", url) as resp:
        declared = int(resp.headers["content-length"])
        for chunk in resp.iter_bytes():
            got += len(chunk)
    assert declared == len(full)
    assert 0 < got < declared
    assert emulator.stats()["faults_injected"]["cut_download"] == 1


def test_cut_upload(emulator: InProcessEmulator) -> None:
    emulator.set_faults(cut_upload_rate=1.0)
    up = httpx.post(f"{runs_url(emulator)}/uploadurl", headers=emulator.headers()).json()
    with pytest.raises(httpx.HTTPError):
        httpx.put(up["upload_url"], content=b"z" * 2_000_000)
    assert create(emulator, input=None, upload_id=up["upload_id"]).status_code == 400


def test_run_failure_rate(emulator: InProcessEmulator) -> None:
    emulator.set_faults(run_failure_rate=1.0)
    run_id = create(emulator).json()["run_id"]
    info = wait_final(emulator, run_id)
    assert info["metadata"]["status_v2"] == "failed"
    assert "injected" in info["error_log"]["error"]


def test_fail_next_k_and_reset_variant(emulator: InProcessEmulator) -> None:
    emulator.set_faults(fail_next={"create": 2}, fail_next_status=503)
    assert [create(emulator).status_code for _ in range(3)] == [503, 503, 200]
    assert emulator.stats()["runs_created"] == 1
    emulator.set_faults(fail_next={"uploadurl": 1}, fail_next_status=0)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.post(f"{runs_url(emulator)}/uploadurl", headers=emulator.headers())


def test_faults_http_endpoint_and_reset_stats(emulator: InProcessEmulator) -> None:
    r = httpx.post(f"{emulator.api_url}/_emulator/faults", json={"error_rate": 1.0})
    assert r.status_code == 200 and r.json()["error_rate"] == 1.0
    assert httpx.get(runs_url(emulator), headers=emulator.headers()).status_code >= 500
    r = httpx.post(f"{emulator.api_url}/_emulator/faults", json={"no_such_knob": 1})
    assert r.status_code == 400 and "no_such_knob" in r.json()["error"]
    r = httpx.post(f"{emulator.api_url}/_emulator/faults", json={"error_rate": 2})
    assert r.status_code == 400
    emulator.set_faults(error_rate=0.0)
    emulator.reset_stats()
    stats = emulator.stats()
    assert stats["requests_by_route"] == {} and stats["faults_injected"] == {}
