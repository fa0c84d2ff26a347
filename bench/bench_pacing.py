"""Benchmark 4 (issue 6): pacing under the service's documented limits.

The emulator enforces 5 run creations per second and 200 result requests per
10 s (429 above them, --rate-limits); 200 instant echo runs with batchrun's
DEFAULT limits (no `limits` in the manifest), concurrency 16.
Target: wall <= 1.1x of runs / 5 per second (= 40 s), and zero 429 responses
(emulator's responses_429 and batchrun's own count).

    python bench/bench_pacing.py [--quick] [--reps N] [--runs N]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _common import (
    Figure,
    apply_once,
    emulator,
    make_inputs,
    print_table,
    run_main,
    save_results,
    verdict,
)
from _common import bench_args as make_args

RATE = 5.0


def main() -> int:
    ap = make_args(__doc__)
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args()
    runs = args.runs or (50 if args.quick else 200)
    reps = args.reps or (1 if args.quick else 3)
    ideal = runs / RATE
    wall, ratio, r429 = Figure(), Figure(), Figure()
    with tempfile.TemporaryDirectory(prefix="bench-pacing-") as tmp:
        root = Path(tmp)
        digests = make_inputs(root / "in", runs)
        with emulator(root / "emu", capacity=64, rate_limits=True) as emu:
            for rep in range(reps):
                m, summary, stats = apply_once(emu, root, f"pace-{rep}", digests, concurrency=16)
                seen = stats["responses_429"] + summary["api_requests"].get("responses_429", 0)
                wall.add(m.wall_s)
                ratio.add(m.wall_s / ideal)
                r429.add(stats["responses_429"])
                print(f"rep {rep + 1}/{reps}: {m.wall_s:.1f}s, 429s {seen}", file=sys.stderr)
    print_table(
        f"Pacing: {runs} instant runs, emulator enforcing {RATE:g} creates/s and 200 results/10 s,"
        f" batchrun default limits, {reps} reps (median [min–max])",
        ["runs / 5 per s", "wall s", "wall / ideal", "429 responses"],
        [[f"{ideal:.1f}", wall.fmt(1), ratio.fmt(3), r429.fmt(0)]],
    )
    ok_wall = ratio.median <= 1.1
    ok_429 = r429.hi == 0
    print(f"\nwall / ideal: {ratio.median:.3f}x (target <= 1.1x): {verdict(ok_wall)}")
    print(f"429 responses: {r429.hi:.0f} (target 0): {verdict(ok_429)}")
    save_results(
        args.results,
        "pacing",
        {
            "runs": runs,
            "reps": reps,
            "ideal_s": ideal,
            "wall": wall.to_json(),
            "ratio": ratio.to_json(),
            "responses_429": r429.to_json(),
            "ok_wall": ok_wall,
            "ok_429": ok_429,
        },
    )
    return 0


if __name__ == "__main__":
    run_main(main)
