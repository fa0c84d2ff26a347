"""The baseline a user without batchrun writes: the official SDK in a thread pool.

    python bench/sdk_baseline.py API_URL APP INPUT_DIR OUT_DIR --threads 64 [--option k=v]

`new_run` + `run_result_with_polling` (default polling options) per input file,
the output written to OUT_DIR/<stem>.json. The key comes from BATCHRUN_BENCH_KEY.
Prints one JSON line: {"runs", "ok", "failed", "wall_s"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nextmv.cloud import Application, Client


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("api_url")
    ap.add_argument("app")
    ap.add_argument("input_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--option", action="append", default=[])
    args = ap.parse_args()
    options = dict(o.split("=", 1) for o in args.option)
    client = Client(api_key=os.environ["BATCHRUN_BENCH_KEY"], url=args.api_url)
    app = Application(client=client, id=args.app)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(args.input_dir.glob("*.json"))

    def one(path: Path) -> bool:
        data = json.loads(path.read_bytes())
        run_id = app.new_run(input=data, name=path.stem, options=options or None)
        result = app.run_result_with_polling(run_id)
        if result.metadata.status_v2.value != "succeeded":
            return False
        (args.out_dir / f"{path.stem}.json").write_text(json.dumps(result.output))
        return True

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        results = list(pool.map(one, files))
    wall = time.perf_counter() - started
    ok = sum(results)
    print(json.dumps({"runs": len(files), "ok": ok, "failed": len(files) - ok, "wall_s": wall}))
    return 0 if ok == len(files) else 1


if __name__ == "__main__":
    sys.exit(main())
