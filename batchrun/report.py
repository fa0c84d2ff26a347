"""Text a person reads: the plan table, the apply summary, the status table.

Plain fixed-width text: it reads the same on a terminal, in CI logs and in
a pasted bug report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .model import Manifest, Plan, RunRecord
from .plan import summary_line

if TYPE_CHECKING:
    from .outcome import ApplyResult


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def plan_text(plan: Plan) -> str:
    rows = [
        [
            r.spec.name,
            r.spec.app,
            r.spec.instance,
            r.spec.input_display,
            str(r.bytes),
            r.transport,
            r.action + (f" ({r.reason})" if r.reason and r.action != "create" else ""),
        ]
        for r in plan.runs
    ]
    headers = ["NAME", "APP", "INSTANCE", "INPUT", "BYTES", "TRANSPORT", "ACTION"]
    return table(headers, rows) + "\n\n" + summary_line(plan)


def apply_text(result: ApplyResult) -> str:
    counts = result.counts()
    order = ["collected", "unchanged", "failed", "canceled", "unfinished"]
    parts = [f"{counts[k]} {k}" for k in order if counts.get(k)]
    requests = result.api_requests.get("requests", 0)
    lines = [
        f"Apply: {', '.join(parts) or 'nothing to do'} in {result.wall_s:.1f}s;"
        f" {human_bytes(result.bytes_uploaded)} up, {human_bytes(result.bytes_downloaded)} down;"
        f" {requests} API requests."
    ]
    for name, error in sorted(result.errors.items()):
        lines.append(f"  ✗ {name}: {error}")
    if result.fatal:
        lines.append(f"Stopped: {result.fatal}")
    if result.interrupted:
        lines.append("Interrupted: state saved; apply again to resume.")
    if result.in_flight and (result.interrupted or result.fatal):
        lines.append("Still running on the service (batchrun cancel MANIFEST stops them):")
        lines.extend(f"  {name}: {run_id}" for name, run_id in result.in_flight)
    return "\n".join(lines)


def status_rows(manifest: Manifest, records: Mapping[str, RunRecord]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for spec in manifest.runs:
        rec = records.get(spec.name)
        rows.append(
            {
                "name": spec.name,
                "phase": rec.phase if rec else "new",
                "run_id": rec.run_id if rec else None,
                "attempt": rec.attempt if rec else 0,
                "output": rec.output_path if rec else None,
                "output_bytes": rec.output_bytes if rec else None,
                "error": rec.error if rec else None,
                "history": list(rec.history) if rec else [],
                "updated_at": rec.updated_at if rec else None,
            }
        )
    return rows


def status_text(rows: Sequence[Mapping[str, object]]) -> str:
    body = [
        [
            str(r["name"]),
            str(r["phase"]),
            str(r["run_id"] or "-"),
            str(r["error"] or ""),
        ]
        for r in rows
    ]
    return table(["NAME", "PHASE", "RUN ID", "ERROR"], body)
