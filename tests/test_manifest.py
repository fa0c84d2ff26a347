"""Manifest loading: the bad-manifest corpus, hostile YAML, and good manifests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from batchrun import manifest as manifest_mod
from batchrun.errors import ManifestError
from batchrun.manifest import (
    MANIFEST_MAX_BYTES,
    load_manifest,
    make_validator,
    schema_text,
)
from batchrun.manifest_schema import _plain_run_ok
from batchrun.model import EMBEDDED_ENDPOINT, Limits

CORPUS = Path(__file__).parent / "bad_manifests"
CASES = sorted(CORPUS.glob("*.yaml"))
EXPECT = b"# expect: "


def expected_lines(path: Path) -> list[str]:
    """Each corpus file ends with '# expect: LINE:COL: ...' comments, one per problem."""
    lines = path.read_bytes().splitlines()
    return [f"{path}:" + raw[len(EXPECT) :].decode() for raw in lines if raw.startswith(EXPECT)]


def problems(path: Path, **kwargs: Any) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kwargs)
    return info.value.problems


def write(tmp: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert all(expected_lines(p) for p in CASES), "every corpus file states its expectation"


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_manifest(path: Path) -> None:
    start = time.monotonic()
    assert problems(path) == expected_lines(path)
    assert time.monotonic() - start < 2.0  # alias bombs and deep nesting stay cheap


# -- hostile YAML made on the fly -------------------------------------------------


def test_deep_flow_nesting_is_bounded(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nruns: " + "[" * 100_000 + "]" * 100_000 + "\n")
    start = time.monotonic()
    assert problems(path) == [
        f"{path}:2:1006: nesting deeper than 64 levels (a manifest needs only a few)"
    ]
    assert time.monotonic() - start < 2.0


def test_deep_block_nesting_is_bounded(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nruns:\n" + "- " * 100_000 + "x\n")
    assert problems(path) == [
        f"{path}:3:127: nesting deeper than 64 levels (a manifest needs only a few)"
    ]


def test_oversized_manifest_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(MANIFEST_MAX_BYTES + 1)  # sparse: nothing to read if we tried
    assert problems(path) == [
        f"{path}: the manifest is 16,777,217 bytes, above the 16 MiB limit "
        "(use globs or fewer runs per manifest)"
    ]


def test_missing_manifest(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert problems(path) == [f"{path}: no such file (check the manifest path)"]


def test_manifest_is_a_folder(tmp_path: Path) -> None:
    assert problems(tmp_path) == [
        f"{tmp_path}: is a folder, not a manifest file (name the YAML file)"
    ]


def test_four_kilobyte_name(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    path = write(
        tmp_path, f"version: 1\napp: x\nruns:\n  - name: {'n' * 4096}\n    input: a.json\n"
    )
    assert problems(path) == [
        f"{path}:4:11: runs[0].name: run name 'nnnnnnnnnnnnnnnnnnnn…' is 4,096 characters "
        "long, at most 128 are allowed (shorten it)"
    ]


def test_output_through_symlinked_folder_is_outside(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    outside = tmp_path.parent / (tmp_path.name + "-outside")
    outside.mkdir()
    (tmp_path / "out").symlink_to(outside)
    path = write(tmp_path, "version: 1\napp: x\nruns:\n  - name: a\n    input: a.json\n")
    assert problems(path) == [
        f"{path}:4:5: runs[0]: output 'out/a.json' is outside the manifest's folder "
        "(keep outputs inside it, or set output_root)"
    ]


def test_output_file_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.json").symlink_to(tmp_path / "a.json")
    path = write(tmp_path, "version: 1\napp: x\nruns:\n  - name: a\n    input: a.json\n")
    assert problems(path) == [
        f"{path}:4:5: runs[0]: output 'out/a.json' is a symlink (remove it: outputs are never "
        "written through links)"
    ]


def test_input_above_default_upload_limit_names_its_size(tmp_path: Path) -> None:
    with open(tmp_path / "big.json", "wb") as f:
        f.truncate(600_000_000)  # sparse
    path = write(tmp_path, "version: 1\napp: x\nruns:\n  - name: a\n    input: big.json\n")
    assert problems(path) == [
        f"{path}:5:12: runs[0].input: input 'big.json' is 600.0 MB (600,000,000 bytes), above "
        "the upload limit of 500.0 MB (split the input or raise limits.upload_max_bytes)"
    ]


def test_unreadable_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root, where chmod 000 still reads: fake the permission check.
    (tmp_path / "a.json").write_text("{}")
    monkeypatch.setattr(manifest_mod.os, "access", lambda *a, **k: False)
    path = write(tmp_path, "version: 1\napp: x\nruns:\n  - name: a\n    input: a.json\n")
    assert problems(path) == [
        f"{path}:5:12: runs[0].input: input 'a.json' is not readable (check its permissions)"
    ]


def test_problem_in_defaults_is_reported_once(tmp_path: Path) -> None:
    for n in "ab":
        (tmp_path / f"{n}.json").write_text("{}")
    path = write(
        tmp_path,
        "version: 1\napp: x\ndefaults: {timeout: 0s}\nruns:\n"
        "  - {name: a, input: a.json}\n  - {name: b, input: b.json}\n",
    )
    assert problems(path) == [
        f"{path}:3:21: defaults.timeout: duration must be greater than 0 (use e.g. '90s' or '10m')"
    ]


def test_error_text_is_one_line_per_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 2\nrunz: []\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == "\n".join(info.value.problems)
    assert len(info.value.problems) == 3
    assert info.value.exit_code == 2


# -- the schema --------------------------------------------------------------------


def test_schema_is_valid_and_closed() -> None:
    schema = json.loads(schema_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node:
                assert node.get("additionalProperties") is False, node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)


def test_remote_ref_is_never_fetched(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import urllib.request

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a schema $ref reached the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    validator = make_validator({"$ref": "https://example.com/evil.schema.json"})
    with pytest.raises(Exception) as info:
        list(validator.iter_errors({"a": 1}))
    assert "example.com" in str(info.value)
    assert not isinstance(info.value, AssertionError)


RUN_ITEMS: list[Any] = [
    {"name": "a", "input": "a.json"},
    {"name": "a", "input": "a.json", "app": "x", "instance": "v", "output": "o", "description": ""},
    {"name": "a", "input": "a.json", "options": {"x": 1, "y": 1.5, "z": True, "w": "s"}},
    {"name": "a", "input": "a.json", "timeout": 5},
    {"name": "a", "input": "a.json", "timeout": "1h30m"},
    {"name": "a", "input": "a.json", "timeout": 0},
    {"name": "a", "input": "a.json", "timeout": True},
    {"name": "a", "input": "a.json", "timeout": float("nan")},
    {"name": "a", "input": "a.json", "timeout": "5 s"},
    {"name": "a", "input": "a.json", "options": {"x": None}},
    {"name": "a", "input": "a.json", "options": {"x": [1]}},
    {"name": "a", "input": "a.json", "options": []},
    {"name": "", "input": "a.json"},
    {"name": "a", "input": ""},
    {"name": "a", "input": "a.json", "app": ""},
    {"name": "a", "input": "a.json", "description": 3},
    {"name": "a", "input": "a.json", "optons": {}},
    {"name": "a"},
    {"input": "a.json"},
    {"name": 1, "input": "a.json"},
    ["name", "a"],
    "a",
]


@pytest.mark.parametrize("item", RUN_ITEMS)
def test_cheap_run_check_is_never_looser_than_the_schema(item: Any) -> None:
    schema = json.loads(schema_text())
    run_schema = {**schema, "$ref": "#/$defs/run"}
    for key in ("type", "properties", "required", "additionalProperties"):
        run_schema.pop(key)
    schema_ok = not list(make_validator(run_schema).iter_errors(item))
    if _plain_run_ok(item):
        assert schema_ok


# -- good manifests ---------------------------------------------------------------


def test_defaults_merge_and_options_become_strings(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    path = write(
        tmp_path,
        """\
version: 1
app: top
defaults:
  instance: v2
  options: {solve.duration: 10s, threads: 4, gap: 0.10, verbose: yes, big: 1.0e+3}
  output: results/{name}.out.json
  description: nightly
  timeout: 1h30m
runs:
  - name: a
    input: a.json
  - name: b
    input: a.json
    app: other
    instance: latest
    options: {threads: 8, quiet: false}
    output: b.json
    timeout: 90
""",
    )
    m = load_manifest(path)
    a, b = m.runs
    assert (a.app, a.instance, a.description, a.timeout_s) == ("top", "v2", "nightly", 5400.0)
    assert a.options == (
        ("big", "1000.0"),
        ("gap", "0.1"),
        ("solve.duration", "10s"),
        ("threads", "4"),
        ("verbose", "true"),
    )
    assert a.output_path == tmp_path / "results" / "a.out.json"
    assert (b.app, b.instance, b.timeout_s) == ("other", "latest", 90.0)
    assert dict(b.options)["threads"] == "8"
    assert dict(b.options)["quiet"] == "false"
    assert dict(b.options)["gap"] == "0.1"  # merged per key from defaults
    assert b.output_path == tmp_path / "b.json"
    assert a.input_path == tmp_path / "a.json" and a.input_display == "a.json"
    assert a.location is not None and (a.location.line, a.location.col) == (10, 5)
    assert (m.version, m.endpoint, m.api_key_env) == (
        1,
        "https://api.cloud.nextmv.io",
        "NEXTMV_API_KEY",
    )
    assert (m.concurrency, m.transfers, m.limits, m.output_root) == (8, 4, Limits(), None)
    assert m.path == path


def test_glob_expansion_with_stem(tmp_path: Path) -> None:
    regions = tmp_path / "inputs" / "regions"
    regions.mkdir(parents=True)
    for n in ("north", "east", "south"):
        (regions / f"{n}.json").write_text("{}")
    (regions / "sub").mkdir()  # folders are not runs
    path = write(
        tmp_path,
        "version: 1\napp: x\nruns:\n  - name: region-{stem}\n    input: inputs/regions/*.json\n"
        "    output: out/{stem}/{name}.json\n",
    )
    runs = load_manifest(path).runs
    assert [r.name for r in runs] == ["region-east", "region-north", "region-south"]
    assert runs[0].input_display == "inputs/regions/east.json"
    assert runs[0].output_path == tmp_path / "out" / "east" / "region-east.json"


def test_literal_brackets_in_a_file_name(tmp_path: Path) -> None:
    (tmp_path / "a[1].json").write_text("{}")
    path = write(tmp_path, "version: 1\napp: x\nruns:\n  - name: a\n    input: a[1].json\n")
    assert load_manifest(path).runs[0].input_path == tmp_path / "a[1].json"


def test_output_root_from_manifest_and_from_caller(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    path = write(
        tmp_path,
        "version: 1\napp: x\noutput_root: results\nruns:\n  - name: a\n    input: a.json\n",
    )
    m = load_manifest(path)
    assert m.output_root == tmp_path / "results"
    assert m.runs[0].output_path == tmp_path / "results" / "out" / "a.json"
    elsewhere = tmp_path / "elsewhere"
    m2 = load_manifest(path, output_root=elsewhere)
    assert m2.output_root == elsewhere
    assert m2.runs[0].output_path == elsewhere / "out" / "a.json"


def test_settings(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "app").mkdir()
    path = write(
        tmp_path,
        """\
version: 1
app: x
endpoint: embedded
api_key_env: MY_KEY
concurrency: 3
transfers: 2
limits: {runs_per_second: 2, results_per_10s: 50, requests_per_minute: 600,
         direct_input_max_bytes: 100, upload_max_bytes: 1000, download_max_bytes: 2000}
embedded:
  apps: {x: app, y: "python solve.py", z: "builtin:echo"}
  capacity: 2
runs: [{name: a, input: a.json}]
""",
    )
    m = load_manifest(path)
    assert m.endpoint == EMBEDDED_ENDPOINT
    assert (m.api_key_env, m.concurrency, m.transfers) == ("MY_KEY", 3, 2)
    assert m.limits == Limits(
        runs_per_second=2.0,
        results_per_10s=50.0,
        requests_per_minute=600.0,
        direct_input_max_bytes=100,
        upload_max_bytes=1000,
        download_max_bytes=2000,
    )
    assert m.embedded.apps == (
        ("x", str(tmp_path / "app")),
        ("y", "python solve.py"),
        ("z", "builtin:echo"),
    )
    assert m.embedded.capacity == 2


def test_endpoint_url_and_aliases(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    path = write(
        tmp_path,
        "version: 1\napp: x\nendpoint: http://127.0.0.1:8080/\n"
        "defaults: {options: &o {threads: 2}}\nruns:\n"
        "  - {name: a, input: a.json, options: *o}\n",
    )
    m = load_manifest(path)
    assert m.endpoint == "http://127.0.0.1:8080"
    assert m.runs[0].options == (("threads", "2"),)


# -- the schema memo --------------------------------------------------------------


def test_schema_memo_skips_an_unchanged_manifest_and_rechecks_a_changed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchrun import manifest_schema

    (tmp_path / "in.json").write_text("{}")
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\napp: a\nruns:\n  - name: r\n    input: in.json\n")
    checks: list[int] = []
    real = manifest_schema._check
    monkeypatch.setattr(manifest_schema, "_check", lambda res: checks.append(1) or real(res))
    load_manifest(path)
    assert checks == [1]
    memo = tmp_path / ".batchrun" / "m.schema-ok"
    assert memo.is_file()
    load_manifest(path)
    assert checks == [1]  # unchanged: not checked again
    # A changed document is checked again, and its errors are reported.
    path.write_text(
        "version: 1\napp: a\nconcurrency: many\nruns:\n  - name: r\n    input: in.json\n"
    )
    with pytest.raises(ManifestError) as exc:
        load_manifest(path)
    assert checks == [1, 1] and "concurrency" in str(exc.value)
    # A memo that does not match (edited, corrupt) is a miss, never a pass.
    path.write_text("version: 1\napp: a\nruns:\n  - name: r\n    input: in.json\n")
    memo.write_text("0" * 64 + "\n")
    load_manifest(path)
    assert checks == [1, 1, 1]


def test_schema_memo_that_cannot_be_written_costs_nothing(tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text("{}")
    path = tmp_path / "m.yaml"
    path.write_text("version: 1\napp: a\nruns:\n  - name: r\n    input: in.json\n")
    (tmp_path / ".batchrun").write_text("a file where the cache folder would go")
    for _ in range(2):
        assert load_manifest(path).runs[0].name == "r"
    assert not list(tmp_path.glob(".schema-*"))  # no temp file left behind
