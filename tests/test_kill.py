"""Row 1 (and 2): SIGKILL the apply process at every step boundary, then apply again.

The apply is always a real `python -m batchrun apply` subprocess; the crash
points of batchrun.crashpoints SIGKILL it from inside at a named step, and the
random-moment loop SIGKILLs it from outside. What is asserted is what the
emulator saw (runs created per entry and per client key, requests per route)
and what is on disk (outputs byte for byte, state loads, no temp leftovers).

CI runs a few iterations; BATCHRUN_FULL=1 (scripts/reliability) runs many.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.apply_helpers import big_json, cli_env, popen_cli, write_json, write_manifest
from tests.reliability_helpers import (
    MIB,
    apply_killed_at,
    apply_until_done,
    compact,
    echo_output,
    file_identity,
    keys_seen_by_server,
    kill_when,
    leftovers,
    load_state,
    record_figures,
    scaled,
    state_dump,
)


def make_batch(folder: Path, endpoint: str) -> tuple[Path, dict[str, bytes]]:
    """A big JSON (upload path), a CSV (upload path) and six small JSON inputs (direct).

    Returns the manifest and, per entry, the exact output the echo app must produce.
    """
    big = big_json(folder / "in" / "big.json", 5 * MIB + 1000)
    csv = folder / "in" / "table.csv"
    csv.write_text("a,b\n" + "".join(f"{i},{i * i}\n" for i in range(500)))
    runs: list[dict[str, Any]] = [
        {"name": "big", "input": "in/big.json"},
        {"name": "csv", "input": "in/table.csv"},
    ]
    expected = {"big": echo_output(big.read_bytes()), "csv": echo_output(csv.read_bytes())}
    for i in range(6):
        path = write_json(folder / "in" / f"s{i}.json", {"i": i, "pad": "p" * (100 * i)})
        runs.append({"name": f"s{i}", "input": f"in/s{i}.json"})
        expected[f"s{i}"] = echo_output(compact(path))
    manifest = write_manifest(folder, endpoint, runs, concurrency=3, transfers=2)
    return manifest, expected


def check_outputs(folder: Path, expected: dict[str, bytes]) -> None:
    for name, data in expected.items():
        out = folder / "out" / f"{name}.json"
        assert out.read_bytes() == data, f"output of {name} is wrong or incomplete"
    assert leftovers(folder) == []


# Kill counts chosen so each kill lands mid-batch (some runs done, some not).
CRASH_POINTS = [
    "after_intent:3",
    "after_create_response:3",
    "mid_upload:3",  # the big input streams in 1 MiB chunks: killed mid-transfer
    "after_upload:1",
    "mid_poll:4",
    "mid_download:3",
    "after_collect:3",
]


@pytest.mark.parametrize("point", CRASH_POINTS, ids=[p.split(":")[0] for p in CRASH_POINTS])
def test_sigkill_at_crash_point_then_apply_again(tmp_path: Path, emulator: Any, point: str) -> None:
    manifest, expected = make_batch(tmp_path, emulator.api_url)
    killed = apply_killed_at(manifest, emulator.api_key, point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)

    before = load_state(manifest)  # the state loads after a SIGKILL (row 2)
    stats_before = emulator.stats()
    assert len(before) < len(expected) or any(r.phase != "collected" for r in before.values())
    outputs_before = {n: file_identity(tmp_path / "out" / f"{n}.json") for n in expected}

    again = apply_until_done(manifest, emulator.api_key, attempts=1)
    assert again.returncode == 0, again.stderr + again.stdout

    stats = emulator.stats()
    # Exactly one service run per entry, and one per client key.
    assert stats["runs_created_by_name"] == {n: 1 for n in expected}
    assert all(n == 1 for n in keys_seen_by_server(stats).values())
    assert stats["requests_by_route"]["create"] == len(expected)
    check_outputs(tmp_path, expected)
    record_figures(
        "crash_point",
        point=point,
        entries=len(expected),
        runs_created=stats["runs_created"],
        duplicates=sum(c - 1 for c in stats["runs_created_by_name"].values() if c > 1),
    )

    after = load_state(manifest)
    assert {r.phase for r in after.values()} == {"collected"}
    for name, rec in before.items():
        if rec.run_id is not None:
            # A run known to the state is polled/adopted again, never recreated.
            assert after[name].run_id == rec.run_id, name
            assert after[name].history == (), name
        if rec.phase == "collected":
            # A finished collection is not redone: the output file is untouched.
            assert file_identity(tmp_path / "out" / f"{name}.json") == outputs_before[name]
    # A finished upload is not redone: only inputs that had not reached storage go again.
    done = ("uploaded", "submitted", "succeeded", "collected")
    redo = [n for n in ("big", "csv") if n not in before or before[n].phase not in done]
    uploads = stats["requests_by_route"].get("upload", 0)
    assert uploads - stats_before["requests_by_route"].get("upload", 0) <= len(redo)


def test_sigkill_during_the_create_post(tmp_path: Path, emulator: Any) -> None:
    """Killed while the create-run POST is at the server (not answered yet)."""
    src = write_json(tmp_path / "a.json", {"a": 1})
    manifest = write_manifest(tmp_path, emulator.api_url, [{"name": "a", "input": "a.json"}])
    emulator.set_faults(latency_s=1.0)  # every API answer waits: the POST is in flight

    def create_arrived() -> bool:
        return emulator.stats()["requests_by_route"].get("create", 0) >= 1

    code = kill_when(manifest, emulator.api_key, create_arrived)
    assert code == -signal.SIGKILL
    rec = load_state(manifest)["a"]
    assert rec.phase == "submitting" and rec.key is not None  # the intent was durable first
    time.sleep(1.5)  # let the server finish (or drop) the orphaned POST
    emulator.set_faults(latency_s=0.0)
    again = apply_until_done(manifest, emulator.api_key, attempts=1)
    assert again.returncode == 0, again.stderr
    stats = emulator.stats()
    assert stats["runs_created_by_name"] == {"a": 1}
    assert keys_seen_by_server(stats) == {rec.key: 1}  # same key: adopted or created once
    assert (tmp_path / "out" / "a.json").read_bytes() == echo_output(compact(src))


def test_random_sigkill_loop_under_faults(tmp_path: Path, emulator_process: Any) -> None:
    """100 runs, the emulator's faults on, SIGKILL at random moments, apply again, repeat."""
    iterations = scaled(3, 30)
    seed = int(os.environ.get("BATCHRUN_KILL_SEED", "0")) or random.randrange(1, 10**6)
    rng = random.Random(seed)
    emu = emulator_process(
        capacity=16,
        seed=seed,
        faults={
            "error_rate": 0.04,
            "rate_429": 0.02,
            "retry_after_s": 1,
            "reset_rate": 0.02,
            "lost_create_rate": 0.1,
            "lost_create_mode": "alternate",
            "cut_download_rate": 0.1,
            "cut_upload_rate": 0.1,
        },
    )
    expected: dict[str, bytes] = {}
    for i in range(96):
        path = write_json(tmp_path / "in" / f"r{i:03d}.json", {"i": i, "w": "x" * (i * 37)})
        expected[f"r-r{i:03d}"] = echo_output(compact(path))
    for i in range(4):
        path = tmp_path / "in" / f"t{i}.csv"
        path.write_text(f"row,{i}\n" * (2000 * (i + 1)))
        expected[f"r-t{i}"] = echo_output(path.read_bytes())
    manifest = write_manifest(
        tmp_path,
        emu.api_url,
        [{"name": "r-{stem}", "input": "in/*.json"}, {"name": "r-{stem}", "input": "in/*.csv"}],
        concurrency=16,
        transfers=4,
    )
    kills = 0
    finished_early = 0
    for _ in range(iterations):
        delay = rng.uniform(0.3, 3.0)
        start = time.monotonic()
        proc = popen_cli("apply", manifest, env=cli_env(emu.api_key))
        try:
            proc.wait(timeout=delay)
            finished_early += 1
        except Exception:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
        finally:
            if proc.stdout:
                proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()
        assert time.monotonic() - start < 60
        load_state(manifest)  # loads after every kill
        stats = emu.stats()
        dup = {n: c for n, c in stats["runs_created_by_name"].items() if c > 1}
        assert not dup, f"duplicate runs after a kill (seed {seed}): {dup}"

    final = apply_until_done(manifest, emu.api_key, attempts=6)
    assert final.returncode == 0, f"seed {seed}: " + final.stderr[-2000:] + final.stdout[-2000:]
    stats = emu.stats()
    assert stats["runs_created_by_name"] == {n: 1 for n in expected}, f"seed {seed}"
    assert all(n == 1 for n in keys_seen_by_server(stats).values()), f"seed {seed}"
    for name, data in expected.items():
        assert (tmp_path / "out" / f"{name}.json").read_bytes() == data, (name, seed)
    assert leftovers(tmp_path) == []
    state = load_state(manifest)
    assert {r.phase for r in state.values()} == {"collected"}
    assert emu.api_key not in state_dump(manifest)
    injected = stats["faults_injected"]
    assert sum(injected.values()) > 0
    record_figures(
        "random_sigkill_loop",
        seed=seed,
        iterations=iterations,
        kills=kills,
        finished_before_kill=finished_early,
        entries=len(expected),
        runs_created=stats["runs_created"],
        duplicates=sum(c - 1 for c in stats["runs_created_by_name"].values() if c > 1),
        faults_injected=injected,
        requests_by_route=stats["requests_by_route"],
    )
