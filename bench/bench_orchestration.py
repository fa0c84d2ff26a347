"""Benchmark 2 (issue 6): orchestration throughput, batchrun vs the official SDK.

2,000 runs of the emulator's in-process echo app at concurrency 64; the
emulator's rate limits off and batchrun's `limits` raised (a higher plan).
Beside it, in the same run and against the same emulator: the SDK script
(bench/sdk_baseline.py: new_run + run_result_with_polling, default polling,
64-thread pool). Figures: runs/s, API requests per run (emulator's
requests_by_route), client CPU s and peak RSS.
Targets: >= 3x the SDK's runs/s; <= 2.5 API requests per run.

    python bench/bench_orchestration.py [--quick] [--reps N] [--runs N]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import (
    HIGH_LIMITS,
    PY,
    BenchError,
    Figure,
    Measured,
    batchrun,
    batchrun_env,
    check_apply,
    check_echo_outputs,
    emulator,
    make_inputs,
    print_table,
    run_main,
    run_measured,
    save_results,
    verdict,
    write_manifest,
)
from _common import bench_args as make_args

HERE = Path(__file__).resolve().parent
CONCURRENCY = 64


def run_batchrun(emu: Any, root: Path, rep: int, digests: dict[str, str]) -> dict[str, Any]:
    out = f"out-br-{rep}"
    manifest = write_manifest(
        root / f"orch-{rep}.yaml",
        endpoint=emu.api_url,
        concurrency=CONCURRENCY,
        limits=HIGH_LIMITS,
        output=out + "/{name}.json",
    )
    emu.reset_stats()
    m = batchrun("apply", manifest, "--json", cwd=root)
    check_apply(m, len(digests))
    return checked_figures("batchrun", emu, m, root / out, digests)


def run_sdk(emu: Any, root: Path, rep: int, digests: dict[str, str]) -> dict[str, Any]:
    out = root / f"out-sdk-{rep}"
    emu.reset_stats()
    args = [PY, str(HERE / "sdk_baseline.py"), emu.api_url, "echo", str(root / "in"), str(out)]
    m = run_measured([*args, "--threads", str(CONCURRENCY)], env=batchrun_env(), timeout=1800)
    if m.rc != 0:
        raise BenchError(f"SDK script exited {m.rc}: {m.stdout[-500:]} {m.stderr[-1500:]}")
    res = json.loads(m.stdout.strip().splitlines()[-1])
    if res["ok"] != len(digests):
        raise BenchError(f"SDK script: {res}")
    return checked_figures("SDK", emu, m, out, digests)


def checked_figures(
    who: str, emu: Any, m: Measured, out: Path, digests: dict[str, str]
) -> dict[str, Any]:
    """One run per input on the service and every output right, then the figures."""
    stats = emu.stats()
    if stats["runs_created"] != len(digests):
        raise BenchError(f"{who} created {stats['runs_created']} runs for {len(digests)}")
    check_echo_outputs(out, digests)
    return {
        "wall_s": m.wall_s,
        "runs_per_s": len(digests) / m.wall_s,
        "req_per_run": emu.api_requests() / len(digests),
        "cpu_s": m.cpu_s,
        "rss_mb": m.maxrss_mb,
        "by_route": stats["requests_by_route"],
    }


def main() -> int:
    ap = make_args(__doc__)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--no-sdk", action="store_true", help="batchrun only (profiling)")
    args = ap.parse_args()
    runs = args.runs or (300 if args.quick else 2000)
    reps = args.reps or (1 if args.quick else 3)
    figs: dict[str, dict[str, Figure]] = {
        who: {k: Figure() for k in ("runs_per_s", "req_per_run", "cpu_s", "rss_mb", "wall_s")}
        for who in ("batchrun", "sdk")
    }
    ratio = Figure()
    routes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        root = Path(tmp)
        digests = make_inputs(root / "in", runs)
        with emulator(root / "emu", capacity=CONCURRENCY) as emu:
            for rep in range(reps):
                order = ["batchrun", "sdk"] if rep % 2 == 0 else ["sdk", "batchrun"]
                got: dict[str, dict[str, Any]] = {}
                for who in order:
                    if who == "sdk" and args.no_sdk:
                        continue
                    fn = run_batchrun if who == "batchrun" else run_sdk
                    got[who] = fn(emu, root, rep, digests)
                    routes[who] = got[who].pop("by_route")
                    for k, v in got[who].items():
                        figs[who][k].add(v)
                    print(
                        f"rep {rep + 1}/{reps} {who}: {got[who]['runs_per_s']:.1f} runs/s",
                        file=sys.stderr,
                    )
                    shutil.rmtree(root / "emu" / "outputs", ignore_errors=True)
                    (root / "emu" / "outputs").mkdir(exist_ok=True)
                if "sdk" in got:
                    ratio.add(got["batchrun"]["runs_per_s"] / got["sdk"]["runs_per_s"])
    rows = []
    for who in ("batchrun", "sdk"):
        f = figs[who]
        if not f["runs_per_s"].values:
            continue
        rows.append(
            [
                who,
                f["runs_per_s"].fmt(1),
                f["req_per_run"].fmt(2),
                f["wall_s"].fmt(1),
                f["cpu_s"].fmt(1),
                f["rss_mb"].fmt(0),
            ]
        )
    print_table(
        f"Orchestration: {runs} echo runs, concurrency {CONCURRENCY}, {reps} reps "
        "(median [min–max])",
        ["client", "runs/s", "API req/run", "wall s", "client CPU s", "peak RSS MB"],
        rows,
    )
    req_ok = figs["batchrun"]["req_per_run"].median <= 2.5
    print(
        f"\nAPI requests per run (batchrun): {figs['batchrun']['req_per_run'].median:.2f} "
        f"(target <= 2.5): {verdict(req_ok)}"
    )
    result: dict[str, Any] = {
        "runs": runs,
        "reps": reps,
        "concurrency": CONCURRENCY,
        "figures": {w: {k: f.to_json() for k, f in d.items() if f.values} for w, d in figs.items()},
        "routes": routes,
        "req_ok": req_ok,
    }
    if ratio.values:
        ratio_ok = ratio.median >= 3.0
        print(f"throughput vs SDK: {ratio.fmt(2)}x (target >= 3x): {verdict(ratio_ok)}")
        result["ratio"] = ratio.to_json()
        result["ratio_ok"] = ratio_ok
    print(f"requests by route (last rep): {json.dumps(routes)}")
    save_results(args.results, "orchestration", result)
    return 0


if __name__ == "__main__":
    run_main(main)
