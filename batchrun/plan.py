"""Planning: file facts (with a hash cache), fingerprints, transport, action per run.

`make_plan` is a pure function of (specs, facts, state records, output facts,
limits); all file reading happens before it, in `gather_facts` and
`output_facts`, through the HashCache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from batchrun.manifest import human_bytes
from batchrun.model import (
    Action,
    FileFacts,
    Limits,
    Plan,
    PlannedRun,
    PlanSummary,
    RunRecord,
    RunSpec,
    Transport,
)

PLAN_JSON_VERSION = 1
CACHE_VERSION = 1
ACTIONS: tuple[Action, ...] = (
    "create",
    "rerun",
    "resume",
    "retry",
    "collect",
    "error",
    "unchanged",
)
# Actions that send the input to the service (and so may upload it).
_SENDS_INPUT: frozenset[Action] = frozenset({"create", "rerun", "retry"})
_CHUNK = 1024 * 1024
# Raw JSON above this multiple of the direct limit is not parsed: its compact
# form is almost surely over the limit too, and parsing a file that size costs
# roughly ten times its size in memory. Misjudging one (a file that is mostly
# whitespace) only means it uploads, which always works: direct is an
# optimisation, upload is the general path.
PARSE_FACTOR = 8
# A file changed within this window of being hashed may have the same size
# and mtime as what was hashed (coarse filesystem timestamps): such a cache
# entry is not trusted until it has been re-hashed later ("racy git").
_RACY_NS = 2_000_000_000


def default_cache_path(manifest_path: Path) -> Path:
    """Where the hash cache of a manifest lives: beside it, in .batchrun/."""
    return manifest_path.parent / ".batchrun" / f"{manifest_path.stem}.hashes.json"


class HashCache:
    """sha256 and JSON facts of files, keyed by (abs path, size, mtime_ns, inode).

    It is only a cache: a missing or corrupt file is an empty cache, and a save
    that fails costs nothing but time on the next plan.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        # abs path → [size, mtime_ns, ino, sha256, compact_json_bytes|None, parsed, hashed_at_ns]
        self.entries: dict[str, list[Any]] = {}
        self.changed = False
        self.reads = 0  # files read (not served from the cache): tests and the benchmark

    @classmethod
    def load(cls, path: Path) -> HashCache:
        cache = cls(path)
        try:
            with open(path, "rb") as f:
                data = json.load(f)
            entries = data["entries"] if data.get("version") == CACHE_VERSION else {}
            cache.entries = {
                k: v for k, v in entries.items() if isinstance(v, list) and len(v) == 7
            }
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            cache.entries = {}
        return cache

    def facts(
        self, path: Path | str, *, direct_limit: int, st: os.stat_result | None = None
    ) -> FileFacts:
        """Facts of a regular file; a cache hit only stats it (or uses `st`, taken by
        the caller just before). OSError if unreadable."""
        key = os.fspath(path)
        if not key.startswith("/"):  # batchrun's own paths are absolute already
            key = os.path.abspath(key)
        if st is None:
            st = os.stat(key)
        parse_bound = direct_limit * PARSE_FACTOR
        entry = self.entries.get(key)
        if (
            entry is not None
            and entry[0] == st.st_size
            and entry[1] == st.st_mtime_ns
            and entry[2] == st.st_ino
            and st.st_mtime_ns + _RACY_NS < entry[6]
            # An entry that skipped JSON parsing is stale once the bound covers it.
            and (entry[5] or st.st_size > parse_bound)
        ):
            return FileFacts(size=entry[0], sha256=entry[3], compact_json_bytes=entry[4])
        hashed_at = time.time_ns()
        sha, compact, parsed = _read_facts(key, st.st_size, parse_bound)
        self.reads += 1
        st_after = os.stat(key)
        if (st_after.st_size, st_after.st_mtime_ns) == (st.st_size, st.st_mtime_ns):
            self.entries[key] = [
                st.st_size,
                st.st_mtime_ns,
                st.st_ino,
                sha,
                compact,
                parsed,
                hashed_at,
            ]
            self.changed = True
        return FileFacts(size=st.st_size, sha256=sha, compact_json_bytes=compact)

    def save(self) -> None:
        """Write atomically (temp + rename) if anything changed."""
        if not self.changed or self.path is None:
            return
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": CACHE_VERSION, "entries": self.entries}, f)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.changed = False


def _read_facts(path: str, size: int, parse_bound: int) -> tuple[str, int | None, bool]:
    """(sha256, compact JSON size or None, whether parsing was attempted) in one read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size > parse_bound:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            return digest.hexdigest(), None, False
        # read(n) allocates n bytes up front: ask for the stat size, not the bound.
        data = f.read(size + 1)
        digest.update(data)
        grown = len(data) > size
        # The file grew since stat: hash the rest, never parse it (nor cache it).
        while grown and (chunk := f.read(_CHUNK)):
            digest.update(chunk)
        if grown:
            return digest.hexdigest(), None, False
    return digest.hexdigest(), compact_json_size(data) if data else None, True


def compact_json_size(data: bytes) -> int | None:
    """Bytes of the input as the nextmv SDK measures it (get_size), or None if not JSON.

    The SDK serialises with json.dumps(obj, separators=(",", ":")) and the
    default ensure_ascii=True, then counts UTF-8 bytes. Only an object or an
    array is sent as JSON; any other document goes as text, so it uploads.
    """
    head = data[:64].lstrip(b" \t\r\n\xef\xbb\xbf")
    if not head.startswith((b"{", b"[")):
        return None  # cheap reject of CSV, text and binary inputs
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict | list):
        return None
    return len(json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def gather_facts(
    specs: Sequence[RunSpec], cache: HashCache, limits: Limits
) -> dict[Path, FileFacts]:
    """Facts of every distinct input file (OSError propagates: the file vanished)."""
    facts: dict[Path, FileFacts] = {}
    for spec in specs:
        if spec.input_path not in facts:
            facts[spec.input_path] = cache.facts(
                spec.input_path, direct_limit=limits.direct_input_max_bytes, st=spec.input_stat
            )
    return facts


def output_facts(records: Mapping[str, RunRecord], cache: HashCache) -> dict[str, FileFacts | None]:
    """Facts of each recorded output file now; None if missing or not a regular file."""
    out: dict[str, FileFacts | None] = {}
    for name, record in records.items():
        if not record.output_path:
            continue
        try:
            st = os.lstat(record.output_path)
            if not stat.S_ISREG(st.st_mode):
                out[name] = None
                continue
            # direct_limit=0: outputs are never sent, so never parse them.
            out[name] = cache.facts(record.output_path, direct_limit=0, st=st)
        except OSError:
            out[name] = None
    return out


def fingerprint(spec: RunSpec, facts: FileFacts) -> str:
    """What makes a run the same run: input content, app, instance and options.

    sha256 of the compact, ASCII JSON of
    ["batchrun-fingerprint-v1", input sha256, app, instance, sorted options].
    Recorded in state files: the formula never changes within a version tag.
    """
    canonical = (
        '["batchrun-fingerprint-v1",'
        + _quote(facts.sha256)
        + _fingerprint_tail(spec.app, spec.instance, spec.options)
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


_quote = json.encoder.encode_basestring_ascii  # json.dumps' own string encoder (C)


@functools.lru_cache(maxsize=1024)
def _fingerprint_tail(app: str, instance: str, options: tuple[tuple[str, str], ...]) -> str:
    # What json.dumps writes after the input hash: encoded once per distinct
    # (app, instance, options), not once per run.
    rest = json.dumps([app, instance, sorted(options)], separators=(",", ":"), ensure_ascii=True)
    return "," + rest[1:]


def choose_transport(facts: FileFacts, limits: Limits) -> Transport:
    """direct iff JSON whose compact serialisation is at most the direct limit (SDK: `>`)."""
    compact = facts.compact_json_bytes
    if compact is not None and compact <= limits.direct_input_max_bytes:
        return "direct"
    return "upload"


def _action(
    spec: RunSpec,
    facts: FileFacts,
    fp: str,
    record: RunRecord | None,
    out: FileFacts | None,
    limits: Limits,
) -> tuple[Action, str]:
    if facts.size > limits.upload_max_bytes:
        return "error", (
            f"input is {facts.size:,} bytes, above the upload limit of "
            f"{limits.upload_max_bytes:,} bytes"
        )
    if record is None:
        return "create", "new run"
    if record.fingerprint != fp:
        return "rerun", "fingerprint changed (input, app, instance or options)"
    phase = record.phase
    if phase in ("planned", "uploading"):
        return "create", f"{phase}: never reached the service"
    if phase in ("uploaded", "submitting", "submitted"):
        return "resume", f"{phase}: in flight"
    if phase == "succeeded":
        return "collect", "succeeded: output not collected yet"
    if phase in ("failed", "canceled"):
        return "retry", f"{phase} before" + (f": {record.error}" if record.error else "")
    # collected
    if record.output_path != str(spec.output_path):
        return "collect", "output path changed"
    if out is None:
        return "collect", "output missing"
    if out.size != record.output_bytes or out.sha256 != record.output_sha256:
        return "collect", "output changed since it was collected"
    return "unchanged", "collected"


def make_plan(
    specs: Sequence[RunSpec],
    facts: Mapping[Path, FileFacts],
    records: Mapping[str, RunRecord],
    outputs: Mapping[str, FileFacts | None],
    limits: Limits,
) -> Plan:
    """The action for every run. Pure: no I/O, no printing."""
    runs: list[PlannedRun] = []
    counts: dict[Action, int] = dict.fromkeys(ACTIONS, 0)
    uploads = upload_bytes = 0
    for spec in specs:
        f = facts[spec.input_path]
        fp = fingerprint(spec, f)
        transport = choose_transport(f, limits)
        record = records.get(spec.name)
        action, reason = _action(spec, f, fp, record, outputs.get(spec.name), limits)
        counts[action] += 1
        if transport == "upload" and action in _SENDS_INPUT:
            uploads += 1
            upload_bytes += f.size
        runs.append(PlannedRun(spec, f.size, transport, action, fp, reason, record))
    summary = PlanSummary(
        counts=tuple((a, counts[a]) for a in ACTIONS),
        uploads=uploads,
        upload_bytes=upload_bytes,
        pending=any(r.action != "unchanged" for r in runs),
    )
    return Plan(runs=tuple(runs), summary=summary)


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The documented, stable `plan --json` object (version 1)."""
    runs = [
        {
            "name": r.spec.name,
            "app": r.spec.app,
            "instance": r.spec.instance,
            "input": r.spec.input_display,
            "bytes": r.bytes,
            "transport": r.transport,
            "action": r.action,
            "fingerprint": r.fingerprint,
            "output": str(r.spec.output_path),
            "reason": r.reason,
            "run_id": r.record.run_id if r.record else None,
        }
        for r in plan.runs
    ]
    summary: dict[str, Any] = dict(plan.summary.counts)
    summary.update(
        uploads=plan.summary.uploads,
        upload_bytes=plan.summary.upload_bytes,
        pending=plan.summary.pending,
    )
    return {"version": PLAN_JSON_VERSION, "runs": runs, "summary": summary}


_PHRASES: dict[Action, str] = {
    "create": "{} to create",
    "rerun": "{} to rerun",
    "resume": "{} to resume",
    "retry": "{} to retry",
    "collect": "{} to collect",
    "error": "{} in error",
    "unchanged": "{} unchanged",
}


def summary_line(plan: Plan) -> str:
    """Terraform-like: 'Plan: 3 to create, 1 to rerun, 12 unchanged; 2 uploads (1.2 GB).'"""
    parts = [_PHRASES[a].format(n) for a, n in plan.summary.counts if n]
    text = "Plan: " + (", ".join(parts) if parts else "no runs")
    n = plan.summary.uploads
    if n:
        text += f"; {n} upload{'s' if n != 1 else ''} ({human_bytes(plan.summary.upload_bytes)})"
    return text + "."
