"""Benchmark 6 (issue 6): resume. `plan` and `apply` of a 10,000-run manifest that
is already done: wall time of each (warm: after one untimed call), and no
request to the service (the emulator's request counts do not change).
Target: under 1 s each, zero requests.

    python bench/bench_resume.py [--quick] [--reps N] [--runs N]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from _common import (
    HIGH_LIMITS,
    BenchError,
    Figure,
    apply_once,
    batchrun,
    emulator,
    make_inputs,
    print_table,
    run_main,
    save_results,
    verdict,
)
from _common import bench_args as make_args


def main() -> int:
    ap = make_args(__doc__)
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args()
    runs = args.runs or (1000 if args.quick else 10_000)
    reps = args.reps or (3 if args.quick else 5)
    figs = {"plan": Figure(), "apply": Figure()}
    rss = {"plan": Figure(), "apply": Figure()}
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        root = Path(tmp)
        digests = make_inputs(root / "in", runs)
        with emulator(root / "emu", capacity=64) as emu:
            setup, _, _ = apply_once(
                emu, root, "resume", digests, concurrency=64, limits=HIGH_LIMITS
            )
            print(f"setup: applied {runs} runs in {setup.wall_s:.1f}s", file=sys.stderr)
            manifest = root / "resume.yaml"
            before = emu.stats()["requests_by_route"]
            for cmd in ("plan", "apply"):
                extra = ["--json"]
                batchrun(cmd, manifest, *extra, cwd=root)  # warm-up, untimed
                for _ in range(reps):
                    m = batchrun(cmd, manifest, *extra, cwd=root)
                    if m.rc != 0:
                        raise BenchError(f"{cmd} exited {m.rc}: {m.stderr[-1000:]}")
                    if cmd == "plan":
                        plan = json.loads(m.stdout)
                        pending = plan.get("summary", {}).get("pending")
                        if pending:
                            raise BenchError(f"plan of a done manifest has {pending} pending")
                    else:
                        lines = [json.loads(x) for x in m.stdout.splitlines() if x.strip()]
                        done = [e for e in lines if e["type"] == "done"][-1]["data"]
                        if done["counts"] != {"unchanged": runs}:
                            raise BenchError(f"apply of a done manifest: {done['counts']}")
                    figs[cmd].add(m.wall_s)
                    rss[cmd].add(m.maxrss_mb)
            after = emu.stats()["requests_by_route"]
            if after != before:
                raise BenchError(f"requests reached the service: {before} -> {after}")
    rows = [[cmd, figs[cmd].fmt(3), rss[cmd].fmt(0), "0"] for cmd in ("plan", "apply")]
    print_table(
        f"Resume: a done {runs:,}-run manifest, warm, {reps} reps (median [min–max])",
        ["command", "wall s", "peak RSS MB", "requests to the service"],
        rows,
    )
    ok = figs["plan"].median < 1.0 and figs["apply"].median < 1.0
    print(
        f"\nplan {figs['plan'].median:.3f}s, apply {figs['apply'].median:.3f}s "
        f"(target < 1 s, no request): {verdict(ok)}"
    )
    save_results(
        args.results,
        "resume",
        {
            "runs": runs,
            "reps": reps,
            "setup_wall_s": setup.wall_s,
            "wall": {k: v.to_json() for k, v in figs.items()},
            "rss": {k: v.to_json() for k, v in rss.items()},
            "requests": 0,
            "ok": ok,
        },
    )
    return 0


if __name__ == "__main__":
    run_main(main)
