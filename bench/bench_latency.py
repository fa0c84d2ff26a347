"""Benchmark 3 (issue 6): latency hiding.

The emulator adds 200 ms to every API call (FaultConfig.latency_s); runs take
2 s on the service (builtin:sleep, duration=2); 1,000 runs at concurrency 64,
emulator capacity 64, rate limits off and batchrun's limits raised.
Ideal = runs x service time / concurrency + one round of latency per API step
(create, result) = 1000 x 2 / 64 + 2 x 0.2 = 31.65 s. Target: wall <= 1.3x ideal.

    python bench/bench_latency.py [--quick] [--reps N] [--runs N]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    API_ROUTES,
    HIGH_LIMITS,
    BenchError,
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
LATENCY_S = 0.2
SERVICE_S = 2.0
API_STEPS = 2  # create, result


def main() -> int:
    ap = make_args(__doc__)
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args()
    runs = args.runs or (192 if args.quick else 1000)
    reps = args.reps or (1 if args.quick else 3)
    ideal = runs * SERVICE_S / CONCURRENCY + API_STEPS * LATENCY_S
    wall, ratio, polls, cpu = Figure(), Figure(), Figure(), Figure()
    options = {"duration": f"{SERVICE_S:g}"}
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        root = Path(tmp)
        digests = make_inputs(root / "in", runs)
        faults = {"latency_s": LATENCY_S}
        with emulator(root / "emu", capacity=CONCURRENCY, faults=faults) as emu:
            for rep in range(reps):
                m, _summary, stats = apply_once(
                    emu,
                    root,
                    f"lat-{rep}",
                    digests,
                    options=options,
                    app="sleep",
                    concurrency=CONCURRENCY,
                    limits=HIGH_LIMITS,
                )
                if stats["peak_running"] > CONCURRENCY:
                    raise BenchError(f"peak running {stats['peak_running']} > {CONCURRENCY}")
                by_route = stats["requests_by_route"]
                wall.add(m.wall_s)
                ratio.add(m.wall_s / ideal)
                polls.add(by_route.get("result", 0) / runs)
                cpu.add(m.cpu_s)
                api = sum(by_route.get(r, 0) for r in API_ROUTES)
                print(
                    f"rep {rep + 1}/{reps}: {m.wall_s:.1f}s, {api / runs:.2f} API req/run",
                    file=sys.stderr,
                )
                shutil.rmtree(root / f"out-lat-{rep}", ignore_errors=True)
    print_table(
        f"Latency hiding: {runs} runs of {SERVICE_S:g}s, +{LATENCY_S * 1000:.0f} ms per API call, "
        f"concurrency {CONCURRENCY}, {reps} reps (median [min–max])",
        ["ideal s", "wall s", "wall / ideal", "result polls/run", "client CPU s"],
        [[f"{ideal:.2f}", wall.fmt(1), ratio.fmt(2), polls.fmt(2), cpu.fmt(1)]],
    )
    ok = ratio.median <= 1.3
    print(f"\nwall / ideal: {ratio.median:.2f}x (target <= 1.3x): {verdict(ok)}")
    result: dict[str, Any] = {
        "runs": runs,
        "reps": reps,
        "ideal_s": ideal,
        "wall": wall.to_json(),
        "ratio": ratio.to_json(),
        "polls_per_run": polls.to_json(),
        "cpu": cpu.to_json(),
        "ok": ok,
    }
    save_results(args.results, "latency", result)
    return 0


if __name__ == "__main__":
    run_main(main)
