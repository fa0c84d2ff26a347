"""Helpers for tests that run the real CLI against a real emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

API_KEY_ENV = "BATCHRUN_TEST_KEY"


def write_manifest(
    folder: Path,
    endpoint: str,
    runs: list[dict[str, Any]],
    *,
    app: str = "echo",
    name: str = "manifest.yaml",
    **top: Any,
) -> Path:
    doc: dict[str, Any] = {
        "version": 1,
        "app": app,
        "endpoint": endpoint,
        "api_key_env": API_KEY_ENV,
        "runs": runs,
    }
    doc.update(top)
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sleep_batch(
    folder: Path, endpoint: str, n: int = 6, *, duration: float = 2, concurrency: int = 3
) -> Path:
    """n inputs in/s<i>.json and a manifest running each on the emulator's sleep app."""
    for i in range(n):
        write_json(folder / "in" / f"s{i}.json", {"i": i})
    return write_manifest(
        folder,
        endpoint,
        [{"name": "s-{stem}", "input": "in/*.json"}],
        app="sleep",
        defaults={"options": {"duration": duration}},
        concurrency=concurrency,
    )


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def cli_env(api_key: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHRUN_")}
    if api_key is not None:
        env[API_KEY_ENV] = api_key
    env.update(extra)
    return env


def run_cli(
    *args: str | Path,
    api_key: str | None = None,
    timeout: float = 180,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchrun", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else cli_env(api_key),
        cwd=cwd,
    )


def popen_cli(
    *args: str | Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchrun", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def big_json(path: Path, min_bytes: int) -> Path:
    """A JSON document whose compact form is just over `min_bytes`."""
    item = "x" * 1000
    n = min_bytes // 1000 + 10
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"items": [item] * n}))
    return path
