"""Run every benchmark of issue 6 (and the plan benchmark of issue 2), then write
docs/performance-results.json, the figures section of docs/performance.md and
docs/performance.png.

    python bench/run_all.py [--quick] [--only upload,orchestration,...] [--no-docs]

Needs the bench extra (pip install -e '.[bench]': matplotlib, nextmv) and curl.
Exit status: non-zero if any benchmark found a wrong result (a missed target
is reported as MISSED in the tables and the document, not as a failure).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DOCS = REPO / "docs"
RESULTS = DOCS / "performance-results.json"
BENCHES = ("upload", "orchestration", "latency", "pacing", "scale", "resume", "plan")
BEGIN = "<!-- figures:begin (written by bench/run_all.py) -->"
END = "<!-- figures:end -->"


def run(name: str, quick: bool, results: Path) -> tuple[int, str, float]:
    script = HERE / f"bench_{name}.py"
    argv = [sys.executable, str(script)]
    if name != "plan":
        argv += ["--results", str(results)]
        if quick:
            argv.append("--quick")
    elif quick:
        argv += ["--runs", "1000"]
    print(f"\n=== {name}: {' '.join(argv[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    took = time.perf_counter() - started
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr[-3000:])
    print(f"=== {name}: exit {proc.returncode} in {took:.0f}s", flush=True)
    return proc.returncode, proc.stdout, took


def fmt(f: dict[str, Any], digits: int = 2) -> str:
    med, lo, hi = f["median"], f["min"], f["max"]
    if len(f["values"]) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def ok(flag: bool) -> str:
    return "met" if flag else "**MISSED**"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines, then a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def figures_md(res: dict[str, Any], plan_out: str | None, meta: dict[str, Any]) -> str:
    out: list[str] = [BEGIN, ""]
    out.append(
        f"Measured {meta['date']} on {meta['machine']} "
        f"({'quick sizes' if meta['quick'] else 'full sizes'}); total {meta['took_s']:.0f} s."
    )
    out.append("Median [min–max] over the repetitions shown.\n")
    out.append("### Summary against the targets\n")
    out.append("| # | benchmark | figure | target | ratio / result | |")
    out.append("|---|---|---|---|---|---|")
    if "upload" in res:
        u = res["upload"]
        out.append(
            f"| 1 | upload {u['mb']} MB: batchrun / raw httpx transfer time | "
            f"{fmt(u['transfer']['batchrun'])} s vs {fmt(u['transfer']['httpx'])} s | ≤ 1.1x | "
            f"{fmt(u['ratio'])}x | {ok(u['ratio_ok'])} |"
        )
        out.append(
            f"| 1 | upload: process wall, interpreter start included | "
            f"{fmt(u['wall']['batchrun'])} s vs {fmt(u['wall']['httpx'])} s | (information) | "
            f"{fmt(u['ratio_wall'])}x | |"
        )
        out.append(
            f"| 1 | upload: batchrun peak RSS (put_file / apply) | "
            f"{u['rss']['batchrun']['max']:.0f} / {u['rss']['apply']['max']:.0f} MB | "
            f"< 100 MB | curl: {u['rss']['curl']['max']:.0f} MB | {ok(u['rss_ok'])} |"
        )
    if "orchestration" in res:
        o = res["orchestration"]
        b, s = o["figures"]["batchrun"], o["figures"].get("sdk")
        if s:
            out.append(
                f"| 2 | orchestration {o['runs']} runs: runs/s vs SDK | "
                f"{fmt(b['runs_per_s'], 1)} vs {fmt(s['runs_per_s'], 1)} | ≥ 3x | "
                f"{fmt(o['ratio'])}x | {ok(o['ratio_ok'])} |"
            )
        out.append(
            f"| 2 | orchestration: API requests per run | {fmt(b['req_per_run'])} "
            f"(SDK {fmt(s['req_per_run']) if s else '-'}) | ≤ 2.5 | "
            f"{b['req_per_run']['median'] / 2.5:.2f} of the budget | {ok(o['req_ok'])} |"
        )
    if "latency" in res:
        lt = res["latency"]
        out.append(
            f"| 3 | latency hiding {lt['runs']} runs: wall vs ideal "
            f"{lt['ideal_s']:.2f} s | {fmt(lt['wall'], 1)} s | ≤ 1.3x | "
            f"{fmt(lt['ratio'])}x | {ok(lt['ok'])} |"
        )
    if "pacing" in res:
        p = res["pacing"]
        out.append(
            f"| 4 | pacing {p['runs']} runs: wall vs {p['ideal_s']:.0f} s | "
            f"{fmt(p['wall'], 1)} s | ≤ 1.1x | {fmt(p['ratio'], 3)}x | "
            f"{ok(p['ok_wall'])} |"
        )
        out.append(
            f"| 4 | pacing: 429 responses | {p['responses_429']['max']:.0f} | 0 | | "
            f"{ok(p['ok_429'])} |"
        )
    if "scale" in res:
        sc = res["scale"]
        per = [sc["by_size"][str(n)]["cpu_ms_per_run"]["median"] for n in sc["sizes"]]
        out.append(
            f"| 5 | scale {'/'.join(f'{n:,}' for n in sc['sizes'])}: CPU ms per run | "
            f"{' / '.join(f'{v:.2f}' for v in per)} | flat (largest two "
            f"within 1.25x) | {sc['growth']:.2f}x | {ok(sc['flat'])} |"
        )
    if "resume" in res:
        r = res["resume"]
        out.append(
            f"| 6 | resume {r['runs']:,} done runs: plan / apply | "
            f"{fmt(r['wall']['plan'], 3)} / {fmt(r['wall']['apply'], 3)} s, "
            f"{r['requests']} requests | < 1 s, 0 requests | "
            f"{max(r['wall']['plan']['median'], r['wall']['apply']['median']):.2f} of "
            f"the budget | {ok(r['ok'])} |"
        )
    out.append("")
    if "upload" in res:
        u = res["upload"]
        out.append(f"### 1. Upload ({u['mb']} MB, {u['reps']} reps)\n")
        labels = {
            "batchrun": "batchrun `StorageClient.put_file`",
            "httpx": "raw httpx streaming PUT",
            "curl": "`curl --data-binary @file`",
            "apply": "`batchrun apply` (hash + upload + run + download)",
        }
        rows = []
        for k, label in labels.items():
            t = u["transfer"].get(k)
            rows.append(
                [
                    label,
                    fmt(t) if t else "-",
                    f"{u['mb'] / (t or u['wall'][k])['median']:.0f}",
                    fmt(u["wall"][k]),
                    fmt(u["rss"][k], 0),
                ]
            )
        out += md_table(["client", "transfer s", "MB/s", "process wall s", "peak RSS MB"], rows)
    if "orchestration" in res:
        o = res["orchestration"]
        out.append(
            f"### 2. Orchestration ({o['runs']} echo runs, concurrency "
            f"{o['concurrency']}, {o['reps']} reps)\n"
        )
        out += md_table(
            ["client", "runs/s", "API requests/run", "wall s", "client CPU s", "peak RSS MB"],
            [
                [
                    who,
                    fmt(f["runs_per_s"], 1),
                    fmt(f["req_per_run"]),
                    fmt(f["wall_s"], 1),
                    fmt(f["cpu_s"], 1),
                    fmt(f["rss_mb"], 0),
                ]
                for who, f in o["figures"].items()
            ],
        )
        out.append(f"Requests by route (last rep): `{json.dumps(o['routes'])}`\n")
    if "latency" in res:
        lt = res["latency"]
        out.append(
            f"### 3. Latency hiding ({lt['runs']} runs of 2 s, +200 ms per API call, "
            f"{lt['reps']} reps)\n"
        )
        out += md_table(
            ["ideal s", "wall s", "wall / ideal", "result polls per run", "client CPU s"],
            [
                [
                    f"{lt['ideal_s']:.2f}",
                    fmt(lt["wall"], 1),
                    fmt(lt["ratio"]),
                    fmt(lt["polls_per_run"]),
                    fmt(lt["cpu"], 1),
                ]
            ],
        )
    if "pacing" in res:
        p = res["pacing"]
        out.append(
            f"### 4. Pacing ({p['runs']} runs, emulator enforcing 5 creates/s and "
            f"200 results/10 s, {p['reps']} reps)\n"
        )
        out += md_table(
            ["runs / 5 per s", "wall s", "wall / ideal", "429 responses"],
            [
                [
                    f"{p['ideal_s']:.0f}",
                    fmt(p["wall"], 1),
                    fmt(p["ratio"], 3),
                    fmt(p["responses_429"], 0),
                ]
            ],
        )
    if "scale" in res:
        sc = res["scale"]
        out.append("### 5. Scale (echo runs, concurrency 64)\n")
        rows = []
        for n in sc["sizes"]:
            d = sc["by_size"][str(n)]
            rows.append(
                [
                    f"{n:,}",
                    str(d["reps"]),
                    fmt(d["wall"], 1),
                    fmt(d["runs_per_s"], 0),
                    fmt(d["cpu_ms_per_run"]),
                    fmt(d["rss_mb"], 0),
                ]
            )
        out += md_table(
            ["runs", "reps", "wall s", "runs/s", "client CPU ms/run", "peak RSS MB"], rows
        )
        out.append("![scale chart](performance.png)\n")
    if "resume" in res:
        r = res["resume"]
        out.append(f"### 6. Resume (a done {r['runs']:,}-run manifest, warm, {r['reps']} reps)\n")
        out += md_table(
            ["command", "wall s", "peak RSS MB", "requests to the service"],
            [
                [f"`batchrun {cmd}`", fmt(r["wall"][cmd], 3), fmt(r["rss"][cmd], 0), "0"]
                for cmd in ("plan", "apply")
            ],
        )
    if plan_out:
        out.append("### Plan benchmark (issue 2: `bench/bench_plan.py`)\n")
        out.append("```")
        out.append(plan_out.strip())
        out.append("```\n")
    out.append(END)
    return "\n".join(out)


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = res.get("scale")
    if not sc:
        return
    sizes = sc["sizes"]
    d = [sc["by_size"][str(n)] for n in sizes]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    specs = [
        ("wall", "wall time (s)", 1.0),
        ("cpu_ms_per_run", "client CPU per run (ms)", 1.0),
        ("rss_mb", "peak RSS (MB)", 1.0),
    ]
    for ax, (key, title, _) in zip(axes, specs, strict=True):
        med = [x[key]["median"] for x in d]
        lo = [x[key]["median"] - x[key]["min"] for x in d]
        hi = [x[key]["max"] - x[key]["median"] for x in d]
        ax.errorbar(sizes, med, yerr=[lo, hi], marker="o", capsize=4)
        ax.set_xscale("log")
        if key == "wall":
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=max(med) * 1.4)
        ax.set_xlabel("runs in the manifest")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    fig.suptitle("batchrun apply, echo runs at concurrency 64 (median, min–max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    results = DOCS / ("performance-results.quick.json" if args.quick else RESULTS.name)
    if results.exists() and set(names) == set(BENCHES):
        results.unlink()
    started = time.perf_counter()
    failed: list[str] = []
    plan_out: str | None = None
    for name in names:
        rc, stdout, _took = run(name, args.quick, results)
        if rc != 0:
            failed.append(name)
        if name == "plan" and rc == 0:
            plan_out = stdout
    took = time.perf_counter() - started
    res: dict[str, Any] = json.loads(results.read_text()) if results.exists() else {}
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        "quick": args.quick,
        "took_s": took,
    }
    if not args.no_docs:
        md_path = DOCS / "performance.md"
        text = md_path.read_text() if md_path.exists() else ""
        block = figures_md(res, plan_out, meta)
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            text = head + block + tail
        else:
            text = text + "\n\n## Figures\n\n" + block + "\n"
        md_path.write_text(text)
        chart(res, DOCS / "performance.png")
        print(f"\nwrote {md_path.relative_to(REPO)} and docs/performance.png")
    print(
        f"\nall benchmarks took {took:.0f}s" + (f"; WRONG RESULTS in: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
