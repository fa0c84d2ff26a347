"""Benchmark validate + plan of a 10,000-run manifest, cold and warm (hash cache).

Prints a table of seconds and MB/s per stage, beside plain hashlib.sha256
over the same files. Usage: python bench/bench_plan.py [--runs N] [--size BYTES]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchrun.manifest import load_manifest
from batchrun.model import Manifest
from batchrun.plan import HashCache, default_cache_path, gather_facts, make_plan


def make_files(root: Path, runs: int, size: int) -> None:
    inputs = root / "inputs"
    inputs.mkdir()
    pad = "x" * max(0, size - 40)
    old = time.time() - 3600
    for i in range(runs):
        p = inputs / f"in-{i:05d}.json"
        p.write_text(f'{{"id": {i}, "pad": "{pad}"}}\n')
        # Inputs are usually older than a plan: files changed within the
        # cache's racy window are re-hashed on purpose, which is not what
        # this benchmark measures.
        os.utime(p, (old, old))
    lines = ["version: 1", "app: bench", "defaults:", "  options: {solve.duration: 10s}", "runs:"]
    per_run = lines + [
        f"  - name: run-{i:05d}\n    input: inputs/in-{i:05d}.json\n    options: {{seed: {i}}}"
        for i in range(runs)
    ]
    (root / "many.yaml").write_text("\n".join(per_run) + "\n")
    glob_one = [*lines, "  - name: run-{stem}", "    input: inputs/*.json"]
    (root / "glob.yaml").write_text("\n".join(glob_one) + "\n")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def plain_sha256(paths: list[Path]) -> tuple[float, int]:
    t = time.perf_counter()
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        hashlib.sha256(data).hexdigest()
        total += len(data)
    return time.perf_counter() - t, total


def one(manifest_path: Path, cache_state: str) -> dict[str, float]:
    cache_file = default_cache_path(manifest_path)
    if cache_state == "cold" and cache_file.exists():
        cache_file.unlink()
    t_load, manifest = timed(lambda: load_manifest(manifest_path))
    assert isinstance(manifest, Manifest)
    t_cache, cache = timed(lambda: HashCache.load(cache_file))
    t_facts, facts = timed(lambda: gather_facts(manifest.runs, cache, manifest.limits))
    t_plan, _ = timed(lambda: make_plan(manifest.runs, facts, {}, {}, manifest.limits))
    t_save, _ = timed(cache.save)
    return {
        "load_manifest": t_load,
        "cache load": t_cache,
        "gather_facts": t_facts,
        "make_plan": t_plan,
        "cache save": t_save,
        "total": t_load + t_cache + t_facts + t_plan + t_save,
        "reads": float(cache.reads),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=2_000, help="bytes per input file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchrun-bench-") as tmp:
        root = Path(tmp)
        make_files(root, args.runs, args.size)
        paths = sorted((root / "inputs").iterdir())
        total_bytes = sum(p.stat().st_size for p in paths)
        mb = total_bytes / 1e6
        print(f"{args.runs:,} runs, {args.runs:,} files, {mb:.1f} MB of input\n")
        header = f"{'variant':<10}{'cache':<6}{'stage':<15}{'seconds':>9}{'MB/s':>9}"
        print(header)
        print("-" * len(header))
        t_sha, _ = plain_sha256(paths)
        print(f"{'-':<10}{'-':<6}{'plain sha256':<15}{t_sha:>9.3f}{mb / t_sha:>9.0f}")
        for variant in ("many.yaml", "glob.yaml"):
            for state in ("cold", "warm"):
                res = one(root / variant, state)
                for stage, secs in res.items():
                    if stage == "reads":
                        continue
                    rate = f"{mb / secs:>9.0f}" if stage in ("gather_facts", "total") else " " * 9
                    print(f"{variant[:-5]:<10}{state:<6}{stage:<15}{secs:>9.3f}{rate}")
                print(f"{'':<16}files read: {int(res['reads']):,}")


if __name__ == "__main__":
    main()
