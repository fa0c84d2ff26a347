"""Row 21: random sequences of submit / lost response / 5xx / 429 / kill & restart /
upload URL expiry / manifest edit, with the invariants checked after every step.

Every step runs the real CLI (`python -m batchrun apply`) against one emulator
(in-process, real loopback HTTP) whose fault knobs are set live; kills use the
crash points (BATCHRUN_CRASH_AT). Invariants, on what the emulator saw:

- at most one service run per client key, and per (entry, fingerprint): the key
  → (entry, fingerprint) map comes from the state file, read after every step
  (a key reaches the service only after its `submitting` intent is durable, so
  a key the state never showed is itself a violation);
- the state always loads (StateStore.read_only) and holds no secret (API key,
  `sig=`, signatures) anywhere in its SQL dump;
- a collected entry whose input was not edited since is never resubmitted (its
  run id and fingerprint stay) and no transient fault ever fails a run.

Faults and kills are only drawn while the plan has work pending (a precondition),
so they hit real transitions. Manifest edits always write new content (a counter),
so a fingerprint never comes back: "≤ 1 run per (entry, fingerprint)" is then
exact. At the end the faults are lifted and one more apply must converge: every
entry collected with byte-correct output.

CI: a few short examples; BATCHRUN_FULL=1 (scripts/reliability): many longer ones.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from batchrun import commands
from batchrun.crashpoints import POINTS
from batchrun.emulator import EmulatorConfig, start_emulator
from tests.apply_helpers import cli_env, run_cli, write_json, write_manifest
from tests.conftest import DEFAULT_APPS, TEST_API_KEY
from tests.reliability_helpers import (
    assert_no_secret,
    compact,
    echo_output,
    keys_seen_by_server,
    load_state,
    record_figures,
    scaled,
    state_dump,
)

SMALL = ["e0", "e1", "e2"]
UPLOAD = "u0"  # a CSV: always the upload path
CLEAR = {
    "fail_next": {},
    "lose_next_creates": 0,
    "expire_uploads": 0,
    "retry_after_s": 0,
    "retry_after_format": "seconds",
}
STATS: dict[str, Any] = {"steps": 0, "kills": 0, "examples": 0, "faults_injected": {}}


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    yield
    record_figures("stateful", **STATS)


class ApplyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="batchrun-stateful-"))
        self.emu = start_emulator(
            EmulatorConfig(
                api_key=TEST_API_KEY,
                apps=DEFAULT_APPS,
                capacity=8,
                data_dir=self.folder / "emulator",
            )
        )
        self.versions = dict.fromkeys([*SMALL, UPLOAD], 0)
        for name in self.versions:
            self.write_input(name)
        self.manifest = write_manifest(
            self.folder,
            self.emu.api_url,
            [{"name": n, "input": f"in/{n}.json"} for n in SMALL]
            + [{"name": UPLOAD, "input": f"in/{UPLOAD}.csv"}],
            concurrency=2,
            transfers=2,
        )
        self.key_owner: dict[str, tuple[str, str]] = {}  # key → (entry, fingerprint)
        self.collected: dict[str, tuple[str, str | None]] = {}  # entry → (fingerprint, run id)
        self.outdated: set[tuple[str, str]] = set()  # (entry, fingerprint) edited away
        STATS["examples"] += 1

    # -- helpers ------------------------------------------------------------------------

    def write_input(self, name: str) -> None:
        v = self.versions[name]
        if name == UPLOAD:
            path = self.folder / "in" / f"{name}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"version,{v}\n" + "row\n" * 3000)
        else:
            write_json(self.folder / "in" / f"{name}.json", {"name": name, "version": v})

    def expected_output(self, name: str) -> bytes:
        if name == UPLOAD:
            return echo_output((self.folder / "in" / f"{name}.csv").read_bytes())
        return echo_output(compact(self.folder / "in" / f"{name}.json"))

    def pending(self) -> bool:
        """Work left (plan, no network): faults and kills only matter when there is."""
        return commands.plan(self.manifest).plan.summary.pending

    def apply(self, **env: str) -> int:
        STATS["steps"] += 1
        result = run_cli("apply", self.manifest, env=cli_env(TEST_API_KEY, **env), timeout=120)
        assert result.returncode in (0, 1, -signal.SIGKILL), result.stderr[-2000:]
        assert "internal error" not in result.stderr, result.stderr[-2000:]
        self.emu.set_faults(**CLEAR)
        return result.returncode

    def faulted_apply(self, **knobs: Any) -> None:
        self.emu.set_faults(**knobs)
        self.apply()

    # -- steps ----------------------------------------------------------------------------

    @rule()
    def submit(self) -> None:
        self.apply()

    @precondition(lambda self: self.pending())
    @rule(n=st.integers(1, 2), mode=st.sampled_from(["502", "reset"]))
    def lost_response(self, n: int, mode: str) -> None:
        self.faulted_apply(lose_next_creates=n, lost_create_mode=mode)

    @precondition(lambda self: self.pending())
    @rule(
        route=st.sampled_from(["create", "result", "list", "uploadurl", "upload", "download"]),
        status=st.sampled_from([500, 502, 503, 504, 0]),  # 0: connection reset
        n=st.integers(1, 2),
    )
    def server_error(self, route: str, status: int, n: int) -> None:
        self.faulted_apply(fail_next={route: n}, fail_next_status=status)

    @precondition(lambda self: self.pending())
    @rule(route=st.sampled_from(["create", "result", "uploadurl", "download"]), n=st.integers(1, 3))
    def too_many_requests(self, route: str, n: int) -> None:
        self.faulted_apply(fail_next={route: n}, fail_next_status=429)

    @precondition(lambda self: self.pending())
    @rule(point=st.sampled_from(sorted(POINTS)), nth=st.integers(1, 2))
    def kill_and_restart(self, point: str, nth: int) -> None:
        if self.apply(BATCHRUN_CRASH_AT=f"{point}:{nth}") == -signal.SIGKILL:
            STATS["kills"] += 1

    @precondition(lambda self: self.pending())
    @rule(n=st.integers(1, 2))
    def upload_url_expiry(self, n: int) -> None:
        self.faulted_apply(expire_uploads=n)

    @rule(name=st.sampled_from([*SMALL, UPLOAD]))
    def manifest_edit(self, name: str) -> None:
        self.versions[name] += 1  # never seen before: a brand-new fingerprint
        self.write_input(name)
        self.collected.pop(name, None)
        rec = load_state(self.manifest).get(name)
        if rec is not None:  # that record is outdated now: not "finished" any more
            self.outdated.add((name, rec.fingerprint))

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def state_loads_and_runs_are_unique(self) -> None:
        records = load_state(self.manifest)  # raises if the state does not load
        if records:
            assert_no_secret(state_dump(self.manifest), TEST_API_KEY, "state file")
        for rec in records.values():
            assert rec.phase not in ("failed", "canceled"), (rec.name, rec.error)
            if rec.key is not None:
                owner = self.key_owner.setdefault(rec.key, (rec.name, rec.fingerprint))
                assert owner == (rec.name, rec.fingerprint), "a key changed owner"
        stats = self.emu.stats()
        per_owner: dict[tuple[str, str], int] = {}
        for key, n in keys_seen_by_server(stats).items():
            assert n == 1, f"{n} service runs carry key {key}"
            assert key in self.key_owner, f"the service has key {key} the state never held"
            owner = self.key_owner[key]
            per_owner[owner] = per_owner.get(owner, 0) + n
        assert all(n <= 1 for n in per_owner.values()), per_owner
        assert stats["runs_created"] == sum(stats["runs_created_by_description"].values())
        # A collected entry, not edited since, is never submitted again.
        for name, (fp, run_id) in self.collected.items():
            rec = records[name]
            assert (rec.fingerprint, rec.run_id) == (fp, run_id), name
            assert rec.phase == "collected", name
        for name, rec in records.items():
            if (
                rec.phase == "collected"
                and name not in self.collected
                and (name, rec.fingerprint) not in self.outdated
            ):
                self.collected[name] = (rec.fingerprint, rec.run_id)

    def teardown(self) -> None:
        try:
            self.emu.set_faults(**CLEAR)
            final = run_cli("apply", self.manifest, env=cli_env(TEST_API_KEY), timeout=120)
            assert final.returncode == 0, final.stderr[-2000:] + final.stdout[-2000:]
            self.state_loads_and_runs_are_unique()
            records = load_state(self.manifest)
            assert {r.phase for r in records.values()} == {"collected"}
            for name in self.versions:
                out = self.folder / "out" / f"{name}.json"
                assert out.read_bytes() == self.expected_output(name), name
            status = json.loads(run_cli("status", self.manifest, "--json").stdout)
            assert len(status["runs"]) == len(self.versions)
        finally:
            injected = STATS["faults_injected"]
            for kind, n in self.emu.stats()["faults_injected"].items():
                injected[kind] = injected.get(kind, 0) + n
            self.emu.stop()
            shutil.rmtree(self.folder, ignore_errors=True)


ApplyMachine.TestCase.settings = settings(
    max_examples=scaled(3, 40),
    stateful_step_count=scaled(5, 12),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestApplyMachine = ApplyMachine.TestCase
