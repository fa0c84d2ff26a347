"""``python -m batchrun.emulator``: the emulator as its own process (tests, CI).

Prints one JSON line ``{"api_url", "storage_url", "pid"}`` once both ports
accept connections, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from batchrun.emulator import (
    EmulatorConfig,
    FaultConfig,
    RunningEmulator,
    parse_app_arg,
    serve_forever,
)
from batchrun.errors import BatchrunError, UsageError


def _knob(value: str) -> tuple[str, Any]:
    name, sep, raw = value.partition("=")
    if not sep:
        raise UsageError(f"--fault expects KNOB=VALUE, got {value!r}")
    try:
        parsed: Any = json.loads(raw)
    except ValueError:
        parsed = raw
    return name.strip(), parsed


def build_parser(prog: str = "python -m batchrun.emulator") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--storage-port", type=int, default=0)
    p.add_argument("--api-key", default=None, help="required bearer key (default: no auth)")
    p.add_argument("--app", action="append", default=[], metavar="ID=COMMAND_OR_DIR")
    p.add_argument("--capacity", type=int, default=4)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--rate-limits", action="store_true")
    p.add_argument("--runs-per-second", type=float, default=5.0)
    p.add_argument("--results-per-10s", type=float, default=200.0)
    p.add_argument("--upload-url-lifetime-s", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="a FaultConfig knob, value as JSON (e.g. error_rate=0.2, fail_next='{\"create\":1}')",
    )
    return p


def main(argv: list[str] | None = None, *, prog: str | None = None, human: bool = False) -> int:
    """`human`: announce the URLs as text for a person (`batchrun emulator`)
    instead of the one JSON line that tests and scripts read."""
    args = build_parser(prog or "python -m batchrun.emulator").parse_args(argv)
    try:
        faults = FaultConfig().replace(**dict(_knob(v) for v in args.fault))
        config = EmulatorConfig(
            api_key=args.api_key,
            apps=tuple(parse_app_arg(a) for a in args.app),
            capacity=args.capacity,
            host=args.host,
            port=args.port,
            storage_port=args.storage_port,
            data_dir=args.data_dir,
            rate_limits=args.rate_limits,
            runs_per_second=args.runs_per_second,
            results_per_10s=args.results_per_10s,
            upload_url_lifetime_s=args.upload_url_lifetime_s,
            seed=args.seed,
            faults=faults,
        )

        def ready(running: RunningEmulator) -> None:
            if human:
                apps = ", ".join(f"{a} = {s}" for a, s in config.apps) or "none (use --app)"
                auth = "required (Bearer)" if config.api_key else "none needed"
                print(
                    f"Nextmv emulator ready.\n"
                    f"  endpoint: {running.api_url}    <- put this in your manifest\n"
                    f"  storage:  {running.storage_url}\n"
                    f"  apps:     {apps}\n"
                    f"  API key:  {auth}\n"
                    "Ctrl-C to stop.",
                    flush=True,
                )
                return
            info = {"api_url": running.api_url, "storage_url": running.storage_url}
            print(json.dumps(info | {"pid": os.getpid()}), flush=True)

        serve_forever(config, ready)
    except BatchrunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
