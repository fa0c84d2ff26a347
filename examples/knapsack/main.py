"""0/1 knapsack, a Nextmv-style decision app in pure Python.

Input (stdin): {"items": [{"id", "value", "weight", ...}], "weight_capacity": N}
Options (argv): -solve.duration 10s  -solve.method auto|dp|greedy
Output (stdout): {"solutions": [{"items": [...], "value": V}], "statistics": {...}}

Exact dynamic programming over capacity when items x capacity is small; above
that (or with -solve.method greedy) a value-density greedy with a single-item
check, which is fast on inputs of many megabytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

DP_CELL_LIMIT = 4_000_000


def parse_duration(value: str) -> float:
    v = value.strip().lower()
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if v.endswith(suffix):
            return float(v[: -len(suffix)]) * factor
    return float(v)


def solve_dp(items: list[dict[str, Any]], capacity: int) -> list[int]:
    """Classic O(n * capacity) DP; returns chosen indices."""
    best = [0] * (capacity + 1)
    keep: list[bytearray] = []
    for it in items:
        w, v = int(it["weight"]), int(it["value"])
        row = bytearray(capacity + 1)
        if w <= capacity:
            for c in range(capacity, w - 1, -1):
                cand = best[c - w] + v
                if cand > best[c]:
                    best[c] = cand
                    row[c] = 1
        keep.append(row)
    chosen: list[int] = []
    c = capacity
    for i in range(len(items) - 1, -1, -1):
        if keep[i][c]:
            chosen.append(i)
            c -= int(items[i]["weight"])
    chosen.reverse()
    return chosen


def solve_greedy(items: list[dict[str, Any]], capacity: int) -> list[int]:
    """Density greedy, then the best single item if that beats it (a 1/2-approximation)."""
    order = sorted(
        range(len(items)),
        key=lambda i: float(items[i]["value"]) / max(float(items[i]["weight"]), 1e-9),
        reverse=True,
    )
    chosen, load, value = [], 0.0, 0.0
    for i in order:
        w = float(items[i]["weight"])
        if load + w <= capacity:
            chosen.append(i)
            load += w
            value += float(items[i]["value"])
    fitting = [i for i in range(len(items)) if float(items[i]["weight"]) <= capacity]
    if fitting:
        top = max(fitting, key=lambda i: float(items[i]["value"]))
        if float(items[top]["value"]) > value:
            chosen = [top]
    return sorted(chosen)


def main() -> int:
    parser = argparse.ArgumentParser(prefix_chars="-", add_help=False)
    parser.add_argument("-solve.duration", dest="duration", default="10s")
    parser.add_argument("-solve.method", dest="method", default="auto")
    args, _unknown = parser.parse_known_args()
    start = time.monotonic()
    try:
        data = json.load(sys.stdin)
        items = data["items"]
        capacity = data["weight_capacity"]
        limit = parse_duration(args.duration)
    except (ValueError, KeyError, TypeError) as exc:
        print(f"invalid input or options: {exc}", file=sys.stderr)
        return 1
    if args.method not in ("auto", "dp", "greedy"):
        print(f"unknown -solve.method {args.method}", file=sys.stderr)
        return 1
    integral = (
        all(float(it["weight"]).is_integer() and float(it["value"]).is_integer() for it in items)
        and float(capacity).is_integer()
    )
    small = integral and len(items) * (int(capacity) + 1) <= DP_CELL_LIMIT
    method = args.method
    if method == "auto" or (method == "dp" and not integral):
        method = "dp" if small else "greedy"
    chosen = solve_dp(items, int(capacity)) if method == "dp" else solve_greedy(items, capacity)
    picked = [items[i] for i in chosen]
    value = sum(it["value"] for it in picked)
    weight = sum(it["weight"] for it in picked)
    elapsed = time.monotonic() - start
    out = {
        "options": {"solve.duration": args.duration, "solve.method": args.method},
        "solutions": [{"items": picked, "value": value}],
        "statistics": {
            "schema": "v1",
            "run": {"duration": round(elapsed, 6)},
            "result": {
                "duration": round(elapsed, 6),
                "value": value,
                "custom": {
                    "method": method,
                    "optimal": method == "dp",
                    "items_total": len(items),
                    "items_chosen": len(picked),
                    "weight": weight,
                    "capacity": capacity,
                    "time_limit_s": limit,
                },
            },
        },
    }
    json.dump(out, sys.stdout, separators=(",", ":"))
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
