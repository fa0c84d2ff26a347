"""Benchmark 5 (issue 6): scale. 100 / 1,000 / 10,000 echo runs at concurrency 64
(rate limits off, batchrun's limits raised): wall time, client CPU seconds per
run and peak RSS of the batchrun process. The cost per run should stay flat.

    python bench/bench_scale.py [--quick] [--reps N] [--sizes 100,1000,10000]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    HIGH_LIMITS,
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

CONCURRENCY = 64


def main() -> int:
    ap = make_args(__doc__)
    ap.add_argument("--sizes", default=None)
    args = ap.parse_args()
    sizes = [
        int(s) for s in (args.sizes or ("100,1000" if args.quick else "100,1000,10000")).split(",")
    ]
    rows: list[list[str]] = []
    result: dict[str, Any] = {"sizes": sizes, "concurrency": CONCURRENCY, "by_size": {}}
    for n in sizes:
        reps = args.reps or (1 if args.quick else (2 if n >= 10_000 else 3))
        wall, cpu_run, rss, rate = Figure(), Figure(), Figure(), Figure()
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            root = Path(tmp)
            digests = make_inputs(root / "in", n)
            with emulator(root / "emu", capacity=CONCURRENCY) as emu:
                for rep in range(reps):
                    m, _summary, _stats = apply_once(
                        emu,
                        root,
                        f"scale-{rep}",
                        digests,
                        concurrency=CONCURRENCY,
                        limits=HIGH_LIMITS,
                    )
                    wall.add(m.wall_s)
                    cpu_run.add(m.cpu_s / n * 1000)
                    rss.add(m.maxrss_mb)
                    rate.add(n / m.wall_s)
                    print(
                        f"{n} runs rep {rep + 1}/{reps}: {m.wall_s:.1f}s "
                        f"{m.cpu_s / n * 1000:.2f} ms CPU/run {m.maxrss_mb:.0f} MB",
                        file=sys.stderr,
                    )
                    shutil.rmtree(root / f"out-scale-{rep}", ignore_errors=True)
                    shutil.rmtree(root / "emu" / "outputs", ignore_errors=True)
                    (root / "emu" / "outputs").mkdir()
        rows.append([f"{n:,}", str(reps), wall.fmt(1), rate.fmt(0), cpu_run.fmt(2), rss.fmt(0)])
        result["by_size"][str(n)] = {
            "reps": reps,
            "wall": wall.to_json(),
            "cpu_ms_per_run": cpu_run.to_json(),
            "rss_mb": rss.to_json(),
            "runs_per_s": rate.to_json(),
        }
    print_table(
        f"Scale: echo runs at concurrency {CONCURRENCY} (median [min–max])",
        ["runs", "reps", "wall s", "runs/s", "client CPU ms/run", "peak RSS MB"],
        rows,
    )
    # Start-up (imports, plan) is ~0.4 s of CPU: it weighs on 100 runs, not on the
    # cost per run. Flat: the two largest sizes within 1.25x of each other.
    per_run = [result["by_size"][str(n)]["cpu_ms_per_run"]["median"] for n in sizes]
    growth = per_run[-1] / per_run[-2] if len(per_run) > 1 else 1.0
    flat = growth <= 1.25
    print(
        f"\nCPU per run, {sizes[-1]:,} vs {sizes[-2] if len(sizes) > 1 else sizes[-1]:,} runs:"
        f" {growth:.2f}x (flat: <= 1.25x): {verdict(flat)}"
    )
    result["flat"] = flat
    result["growth"] = growth
    save_results(args.results, "scale", result)
    return 0


if __name__ == "__main__":
    run_main(main)
