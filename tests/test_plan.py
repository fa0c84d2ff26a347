"""Planning: transport choice, fingerprints, the hash cache, actions, JSON and summary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from nextmv.cloud.client import get_size

from batchrun.model import (
    MIB,
    FileFacts,
    Limits,
    Phase,
    Plan,
    PlanSummary,
    RunRecord,
    RunSpec,
)
from batchrun.plan import (
    HashCache,
    choose_transport,
    default_cache_path,
    fingerprint,
    gather_facts,
    make_plan,
    output_facts,
    plan_to_json,
    summary_line,
)

OLD = 1_300_000_000  # an mtime well outside the cache's racy window
LIMITS = Limits()


def old_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))
    return path


def spec(name: str = "a", input_path: Path = Path("/in/a.json"), **kw: Any) -> RunSpec:
    base: dict[str, Any] = dict(
        name=name,
        app="app",
        instance="latest",
        input_path=input_path,
        input_display=input_path.name,
        options=(("threads", "4"),),
        output_path=Path(f"/out/{name}.json"),
    )
    base.update(kw)
    return RunSpec(**base)


def facts_of(data: bytes, compact: int | None = 10) -> FileFacts:
    return FileFacts(len(data), hashlib.sha256(data).hexdigest(), compact)


# -- transport ---------------------------------------------------------------------


def json_of_compact_size(target: int) -> tuple[bytes, dict[str, str]]:
    obj = {"d": "x" * (target - len('{"d":""}'))}
    # Pretty-printed on disk, so the raw size is not what is measured.
    return json.dumps(obj, indent=4).encode(), obj


@pytest.mark.parametrize(("extra", "transport"), [(0, "direct"), (1, "upload")])
def test_transport_at_the_direct_limit(tmp_path: Path, extra: int, transport: str) -> None:
    data, obj = json_of_compact_size(5 * MIB + extra)
    path = old_file(tmp_path / "in.json", data)
    facts = HashCache().facts(path, direct_limit=LIMITS.direct_input_max_bytes)
    assert facts.compact_json_bytes == 5_242_880 + extra == get_size(obj)
    assert facts.size > facts.compact_json_bytes
    assert choose_transport(facts, LIMITS) == transport


def test_compact_size_escapes_non_ascii_like_the_sdk(tmp_path: Path) -> None:
    obj = {"name": "Zürich – 東京", "n": [1, 2.50, True, None]}
    path = old_file(tmp_path / "in.json", json.dumps(obj, ensure_ascii=False).encode())
    facts = HashCache().facts(path, direct_limit=LIMITS.direct_input_max_bytes)
    assert facts.compact_json_bytes == get_size(obj)
    exact = dataclasses.replace(LIMITS, direct_input_max_bytes=get_size(obj))
    assert choose_transport(facts, exact) == "direct"
    below = dataclasses.replace(LIMITS, direct_input_max_bytes=get_size(obj) - 1)
    assert choose_transport(facts, below) == "upload"


@pytest.mark.parametrize(
    "data", [b"a,b\n1,2\n", b'"just a string"', b"42", b'{"broken": ', b"\xff\xfe{}"]
)
def test_non_json_uploads(tmp_path: Path, data: bytes) -> None:
    path = old_file(tmp_path / "in.txt", data)
    facts = HashCache().facts(path, direct_limit=LIMITS.direct_input_max_bytes)
    assert facts.compact_json_bytes is None
    assert choose_transport(facts, LIMITS) == "upload"


def test_large_raw_file_is_not_parsed(tmp_path: Path) -> None:
    # 8x the direct limit in raw bytes: uploads without parsing, even though
    # this one would compact to 7 bytes (upload always works; see PARSE_FACTOR).
    path = old_file(tmp_path / "in.json", b'{"a":1}' + b" " * 100)
    facts = HashCache().facts(path, direct_limit=10)
    assert facts.compact_json_bytes is None
    assert choose_transport(facts, dataclasses.replace(LIMITS, direct_input_max_bytes=10)) == (
        "upload"
    )


# -- fingerprint -------------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive() -> None:
    f = facts_of(b"{}")
    base = fingerprint(spec(), f)
    assert base == fingerprint(spec(), f)
    assert len(base) == 64 and int(base, 16) >= 0
    changed = {
        fingerprint(spec(), facts_of(b"{ }")),
        fingerprint(spec(app="other"), f),
        fingerprint(spec(instance="v2"), f),
        fingerprint(spec(options=(("threads", "8"),)), f),
        fingerprint(spec(options=(("threads", "4"), ("x", "1"))), f),
        fingerprint(spec(options=()), f),
    }
    assert base not in changed and len(changed) == 6
    # Only content, app, instance and options count.
    same = spec(
        name="b",
        input_path=Path("/elsewhere/b.json"),
        output_path=Path("/o/b.json"),
        description="d",
        timeout_s=5.0,
    )
    assert fingerprint(same, f) == base
    assert fingerprint(spec(options=(("a", "1"), ("b", "2"))), f) == fingerprint(
        spec(options=(("b", "2"), ("a", "1"))), f
    )


@pytest.mark.parametrize(
    ("app", "instance", "options"),
    [
        ("app", "latest", ()),
        ('q"uote\\', "é-ünïcode", (("k\n", 'v"'), ("a", "\u2028"))),
        ("🚀", "in\tst", (("z", ""), ("", "x"))),
    ],
)
def test_fingerprint_is_the_documented_formula(
    app: str, instance: str, options: tuple[tuple[str, str], ...]
) -> None:
    """State files hold fingerprints: the fast path must equal the formula byte for byte."""
    f = facts_of(b'{"a": 1}')
    canonical = json.dumps(
        ["batchrun-fingerprint-v1", f.sha256, app, instance, sorted(options)],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    want = hashlib.sha256(canonical.encode("ascii")).hexdigest()
    assert fingerprint(spec(app=app, instance=instance, options=options), f) == want


# -- hash cache ----------------------------------------------------------------------


def test_cache_hit_reads_nothing(tmp_path: Path) -> None:
    path = old_file(tmp_path / "in.json", b'{"a": 1}')
    cache_file = default_cache_path(tmp_path / "m.yaml")
    assert cache_file == tmp_path / ".batchrun" / "m.hashes.json"
    cache = HashCache.load(cache_file)
    first = cache.facts(path, direct_limit=LIMITS.direct_input_max_bytes)
    assert cache.reads == 1
    cache.save()
    # Same size, same mtime_ns, same inode, different bytes: only a cache that
    # never reads the file can still answer with the first hash.
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(b'{"a": 2}')
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    warm = HashCache.load(cache_file)
    assert warm.facts(path, direct_limit=LIMITS.direct_input_max_bytes) == first
    assert warm.reads == 0
    warm.save()  # nothing changed: nothing written
    assert not warm.changed


def test_cache_misses_on_change(tmp_path: Path) -> None:
    path = old_file(tmp_path / "in.json", b'{"a": 1}')
    cache = HashCache()
    cache.facts(path, direct_limit=100)
    old_file(path, b'{"a": 22}')  # size changed
    assert cache.facts(path, direct_limit=100).sha256 == hashlib.sha256(b'{"a": 22}').hexdigest()
    assert cache.reads == 2
    # Replaced by another file (new inode), same size and mtime.
    other = old_file(tmp_path / "other.json", b'{"a": 33}')
    os.replace(other, path)
    assert cache.facts(path, direct_limit=100).sha256 == hashlib.sha256(b'{"a": 33}').hexdigest()
    assert cache.reads == 3


def test_recently_modified_file_is_rehashed(tmp_path: Path) -> None:
    path = tmp_path / "in.json"
    path.write_bytes(b"{}")  # mtime: now, inside the racy window
    cache = HashCache()
    cache.facts(path, direct_limit=100)
    cache.facts(path, direct_limit=100)
    assert cache.reads == 2


def test_skipped_parse_is_redone_when_the_limit_grows(tmp_path: Path) -> None:
    path = old_file(tmp_path / "in.json", b'{"a":1}' + b" " * 100)
    cache = HashCache()
    assert cache.facts(path, direct_limit=10).compact_json_bytes is None
    assert cache.facts(path, direct_limit=10).compact_json_bytes is None
    assert cache.reads == 1
    assert cache.facts(path, direct_limit=1000).compact_json_bytes == 7
    assert cache.reads == 2


@pytest.mark.parametrize(
    "content", [b"", b"not json", b"[]", b'{"version": 99, "entries": {}}', b'{"entries": 3}']
)
def test_corrupt_cache_is_empty(tmp_path: Path, content: bytes) -> None:
    cache_file = tmp_path / "c.json"
    cache_file.write_bytes(content)
    cache = HashCache.load(cache_file)
    assert cache.entries == {}
    path = old_file(tmp_path / "in.json", b"{}")
    cache.facts(path, direct_limit=100)
    cache.save()
    assert json.loads(cache_file.read_text())["version"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_gather_and_output_facts(tmp_path: Path) -> None:
    a = old_file(tmp_path / "a.json", b"{}")
    out = old_file(tmp_path / "out.json", b'{"result": 1}')
    (tmp_path / "folder").mkdir()
    cache = HashCache()
    specs = [spec("a", a), spec("b", a)]
    facts = gather_facts(specs, cache, LIMITS)
    assert list(facts) == [a] and cache.reads == 1
    records = {
        "a": RunRecord("a", "fp", "collected", output_path=str(out)),
        "b": RunRecord("b", "fp", "collected", output_path=str(tmp_path / "gone.json")),
        "c": RunRecord("c", "fp", "collected", output_path=str(tmp_path / "folder")),
        "d": RunRecord("d", "fp", "submitted"),
    }
    got = output_facts(records, cache)
    assert got == {"a": facts_of(b'{"result": 1}', None), "b": None, "c": None}


# -- actions -------------------------------------------------------------------------


def plan_one(
    record: RunRecord | None,
    out: FileFacts | None = None,
    limits: Limits = LIMITS,
    data: bytes = b"{}",
) -> tuple[str, str]:
    s = spec()
    f = facts_of(data)
    outputs = {"a": out} if out is not None else {}
    records = {"a": record} if record is not None else {}
    run = make_plan([s], {s.input_path: f}, records, outputs, limits).runs[0]
    return run.action, run.reason


FP = fingerprint(spec(), facts_of(b"{}"))
OUT = facts_of(b"result", None)


def rec(phase: Phase, **kw: Any) -> RunRecord:
    return RunRecord("a", kw.pop("fingerprint", FP), phase, **kw)


def collected(**kw: Any) -> RunRecord:
    base = dict(output_path="/out/a.json", output_sha256=OUT.sha256, output_bytes=OUT.size)
    base.update(kw)
    return rec("collected", **base)


@pytest.mark.parametrize(
    ("record", "out", "action", "reason"),
    [
        (None, None, "create", "new run"),
        (rec("collected", fingerprint="0" * 64), None, "rerun", "fingerprint changed"),
        (rec("submitted", fingerprint="0" * 64), None, "rerun", "fingerprint changed"),
        (rec("planned"), None, "create", "planned: never reached the service"),
        (rec("uploading"), None, "create", "uploading: never reached the service"),
        (rec("uploaded"), None, "resume", "uploaded: in flight"),
        (rec("submitting"), None, "resume", "submitting: in flight"),
        (rec("submitted"), None, "resume", "submitted: in flight"),
        (rec("succeeded"), None, "collect", "succeeded: output not collected yet"),
        (rec("failed", error="infeasible"), None, "retry", "failed before: infeasible"),
        (rec("canceled"), None, "retry", "canceled before"),
        (collected(), OUT, "unchanged", "collected"),
        (collected(), None, "collect", "output missing"),
        (collected(), facts_of(b"other!", None), "collect", "output changed"),
        (collected(output_bytes=99), OUT, "collect", "output changed"),
        (collected(output_path="/old/a.json"), OUT, "collect", "output path changed"),
    ],
)
def test_action_rules(
    record: RunRecord | None, out: FileFacts | None, action: str, reason: str
) -> None:
    got_action, got_reason = plan_one(record, out)
    assert got_action == action
    assert got_reason.startswith(reason)


def test_input_above_upload_limit_is_an_error() -> None:
    tiny = dataclasses.replace(LIMITS, upload_max_bytes=1)
    action, reason = plan_one(None, limits=tiny)
    assert (action, reason) == ("error", "input is 2 bytes, above the upload limit of 1 bytes")


def test_plan_summary_json_and_line() -> None:
    small = facts_of(b"{}", 2)
    big = FileFacts(300_000_000, "b" * 64, None)
    csv = FileFacts(300_000_000, "c" * 64, None)
    specs = [
        spec("new", Path("/in/s.json")),
        spec("big", Path("/in/big.json")),
        spec("csv", Path("/in/t.csv")),
        spec("done", Path("/in/s.json")),
        spec("again", Path("/in/s.json")),
    ]
    facts = {Path("/in/s.json"): small, Path("/in/big.json"): big, Path("/in/t.csv"): csv}
    fp_small = fingerprint(specs[3], small)
    out = facts_of(b"out", None)
    records = {
        "done": RunRecord(
            "done",
            fp_small,
            "collected",
            run_id="run-1",
            output_path="/out/done.json",
            output_sha256=out.sha256,
            output_bytes=out.size,
        ),
        "again": RunRecord("again", "x", "failed", run_id="run-2"),
        "csv": RunRecord("csv", fingerprint(specs[2], csv), "submitted", run_id="run-3"),
    }
    plan = make_plan(specs, facts, records, {"done": out}, LIMITS)
    assert [r.action for r in plan.runs] == ["create", "create", "resume", "unchanged", "rerun"]
    assert [r.transport for r in plan.runs] == ["direct", "upload", "upload", "direct", "direct"]
    assert plan.summary.uploads == 1 and plan.summary.upload_bytes == 300_000_000
    assert plan.summary.pending
    doc = plan_to_json(plan)
    assert json.loads(json.dumps(doc)) == doc
    assert doc["version"] == 1
    assert list(doc["runs"][0]) == [
        "name",
        "app",
        "instance",
        "input",
        "bytes",
        "transport",
        "action",
        "fingerprint",
        "output",
        "reason",
        "run_id",
    ]
    assert doc["runs"][3]["run_id"] == "run-1" and doc["runs"][0]["run_id"] is None
    assert doc["runs"][1]["bytes"] == 300_000_000
    assert doc["summary"] == {
        "create": 2,
        "rerun": 1,
        "resume": 1,
        "retry": 0,
        "collect": 0,
        "error": 0,
        "unchanged": 1,
        "uploads": 1,
        "upload_bytes": 300_000_000,
        "pending": True,
    }
    assert summary_line(plan) == (
        "Plan: 2 to create, 1 to rerun, 1 to resume, 1 unchanged; 1 upload (300.0 MB)."
    )


def test_summary_line_wording() -> None:
    def line(counts: dict[str, int], uploads: int = 0, size: int = 0) -> str:
        summary = PlanSummary(tuple(counts.items()), uploads, size, True)  # type: ignore[arg-type]
        return summary_line(Plan((), summary))

    assert line({"create": 3, "rerun": 1, "unchanged": 12}, 2, 1_200_000_000) == (
        "Plan: 3 to create, 1 to rerun, 12 unchanged; 2 uploads (1.2 GB)."
    )
    assert line({"create": 0, "unchanged": 4}) == "Plan: 4 unchanged."
    assert line({"retry": 1, "collect": 2, "error": 1}) == (
        "Plan: 1 to retry, 2 to collect, 1 in error."
    )


def test_nothing_pending_when_all_unchanged() -> None:
    s = spec()
    f = facts_of(b"{}")
    record = collected()
    plan = make_plan([s], {s.input_path: f}, {"a": record}, {"a": OUT}, LIMITS)
    assert not plan.summary.pending
    assert summary_line(plan) == "Plan: 1 unchanged."
