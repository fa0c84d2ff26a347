"""Row 18 (and 19-20 indirectly): a bounded-time fuzz of the manifest loader.

Whatever the bytes, `load_manifest` returns a Manifest or raises ManifestError
(batchrun's own error, with one line per problem): never another exception,
never a hang, never unbounded memory. Three generators: random text, random
byte-level mutations of a valid manifest (with YAML-hostile fragments spliced
in), and structurally random documents dumped as YAML.

The hand-made hostile corpus is tests/bad_manifests (alias_bomb, recursive_alias,
deep_nesting, python_object_tag, python_name_key_tag, set_tag, custom_tag,
binary_tag, merge_key, duplicate_*_key, two_documents, not_utf8, raw_nul, ...)
run by tests/test_manifest.py::test_bad_manifest, plus the 100,000-deep flow
and block nesting and the 16 MiB+1 (sparse) file in tests/test_manifest.py.
This file adds the hostile cases those do not cover.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchrun.errors import ManifestError
from batchrun.manifest import load_manifest
from batchrun.model import Manifest
from tests.reliability_helpers import record_figures, scaled

TIME_LIMIT_S = 2.0
MEMORY_LIMIT = 400 * 1024 * 1024  # peak RSS of a process loading one hostile manifest

VALID = """\
version: 1
app: knapsack
endpoint: https://api.example.test
defaults:
  instance: latest
  options: {solve.duration: 10s, threads: 2, verbose: true}
  output: out/{name}.json
concurrency: 4
limits: {runs_per_second: 5, results_per_10s: 200}
runs:
  - name: small
    input: a.json
  - name: other
    input: b.json
    options: {solve.duration: 60s}
  - name: r-{stem}
    input: in/*.json
"""

HOSTILE = [
    "&a ", "*a", "<<: *a\n", "!!python/object/apply:os.system ['true']", "!!binary aGk=",
    "!!set {a}", "!custom x", "? [a]\n: b\n", "---\n", "...\n", "{", "}", "[", "]", "- ",
    ": ", "\t", "\x00", "\ufeff", "\r\n", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "'", '"',
    "|\n  x\n", ">-\n", "#", "version: 2\n", "name: ../../etc/passwd", "output: /etc/x",
    "input: ../../../etc/shadow", "runs: *a", "\\x85", "\u2028", "9" * 400, "-.inf", ".nan",
    "0x1F", "0o17", "1e999", "~", "null", "yes", "2001-12-14t21:59:43.10-05:00",
]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "a.json").write_text('{"a": 1}')
    (d / "b.json").write_text('{"b": 2}')
    (d / "in").mkdir()
    for i in range(3):
        (d / "in" / f"x{i}.json").write_text("{}")
    return d


FIGURES: dict[str, float] = {"loads": 0, "refused": 0, "accepted": 0, "max_load_s": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    yield
    record_figures("fuzz_manifest", **FIGURES)


def check(folder: Path, data: bytes, name: str = "m.yaml") -> Manifest | None:
    """Load; only ManifestError may come out, within the time limit."""
    FIGURES["loads"] += 1
    path = folder / name
    path.write_bytes(data)
    start = time.monotonic()
    try:
        manifest = load_manifest(path)
        FIGURES["accepted"] += 1
        return manifest
    except ManifestError as exc:
        FIGURES["refused"] += 1
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        assert all("\n" not in p for p in exc.problems), exc.problems  # one line each
        return None
    finally:
        elapsed = time.monotonic() - start
        FIGURES["max_load_s"] = max(FIGURES["max_load_s"], round(elapsed, 4))
        assert elapsed < TIME_LIMIT_S, f"{elapsed:.2f}s on {data[:200]!r}"


FUZZ = settings(
    max_examples=scaled(120, 2000),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)


def test_the_seed_manifest_is_valid(folder: Path) -> None:
    m = check(folder, VALID.encode())
    assert m is not None and len(m.runs) == 5


@FUZZ
@given(text=st.text(max_size=400))
def test_random_text(folder: Path, text: str) -> None:
    check(folder, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(folder: Path, data: bytes) -> None:
    check(folder, data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    text = VALID
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "dup_line", "indent", "replace"]))
        if op == "insert":
            frag = draw(st.one_of(st.sampled_from(HOSTILE), st.text(max_size=8)))
            text = text[:i] + frag + text[i:]
        elif op == "delete":
            j = draw(st.integers(i, min(len(text), i + 40)))
            text = text[:i] + text[j:]
        elif op == "dup_line":
            lines = text.splitlines(keepends=True)
            k = draw(st.integers(0, len(lines) - 1))
            lines.insert(k, lines[k])
            text = "".join(lines)
        elif op == "indent":
            lines = text.splitlines(keepends=True)
            k = draw(st.integers(0, len(lines) - 1))
            lines[k] = " " * draw(st.integers(1, 3)) + lines[k]
            text = "".join(lines)
        else:
            j = draw(st.integers(i, min(len(text), i + 10)))
            text = text[:i] + draw(st.sampled_from(HOSTILE)) + text[j:]
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(data=mutated())
def test_mutated_valid_manifest(folder: Path, data: bytes) -> None:
    m = check(folder, data)
    if m is not None:  # whatever is accepted keeps its outputs inside the folder
        for spec in m.runs:
            assert spec.output_path.resolve().is_relative_to(folder.resolve())


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["a.json", "in/*.json", "out/{name}.json", "{stem}", "../x", "10s"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=12) | st.sampled_from(["name", "input"]), inner, max_size=4
        )
    ),
    max_leaves=20,
)
FIELDS = ["version", "app", "endpoint", "defaults", "concurrency", "limits", "runs", "transfers"]


@FUZZ
@given(
    doc=st.fixed_dictionaries(
        {"version": st.one_of(st.just(1), values), "app": st.one_of(st.just("x"), values)},
        optional={f: values for f in FIELDS[2:]},
    )
)
def test_structured_random_document(folder: Path, doc: dict[str, object]) -> None:
    check(folder, yaml.safe_dump(doc, allow_unicode=True).encode())


# -- targeted hostile YAML not in tests/bad_manifests --------------------------------------


CHILD = """
import json, resource, sys, time
from batchrun.errors import ManifestError
from batchrun.manifest import load_manifest
start = time.monotonic()
try:
    load_manifest(sys.argv[1])
    problems = None
except ManifestError as exc:
    problems = exc.problems
elapsed = time.monotonic() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"problems": problems, "elapsed": elapsed, "rss": rss}))
"""


def bounded(
    folder: Path,
    data: bytes,
    name: str,
    seconds: float = 2 * TIME_LIMIT_S,
    memory: int = MEMORY_LIMIT,
) -> list[str]:
    """Load in a child process: only ManifestError, bounded time and peak memory (RSS).

    Any other exception fails the child (no JSON line); a hang hits the timeout.
    """
    path = folder / name
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["problems"], "a hostile manifest was accepted"
    assert result["elapsed"] < seconds, result["elapsed"]
    assert result["rss"] < memory, f"peak RSS {result['rss']:,} bytes"
    problems: list[str] = result["problems"]
    return problems


HEAD = b"version: 1\napp: x\n"
RUN = b"runs:\n  - name: a\n    input: a.json\n"


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        # Billion laughs with mappings instead of lists (the corpus uses lists).
        (
            "laughs_map.yaml",
            HEAD
            + b"a0: &a0 {k0: z, k1: z, k2: z, k3: z, k4: z, k5: z, k6: z, k7: z, k8: z, k9: z}\n"
            + b"".join(
                b"a%d: &a%d {%s}\n"
                % (i, i, b", ".join(b"k%d: *a%d" % (j, i - 1) for j in range(10)))
                for i in range(1, 9)
            )
            + RUN,
            "alias",
        ),
        # Many aliases, each cheap, together over the limit.
        (
            "wide_aliases.yaml",
            HEAD
            + b"big: &b ["
            + b",".join(b"x" for _ in range(1000))
            + b"]\nmany: ["
            + b",".join(b"*b" for _ in range(500))
            + b"]\n"
            + RUN,
            "alias",
        ),
        # Flat but huge: 2.1 million nodes in 4.2 MB (slow: see test_node_limit_is_bounded).
        # Python tags in every spot the corpus does not try.
        ("py_new.yaml", HEAD + b"x: !!python/object/new:os.system [true]\n" + RUN, "tag"),
        ("py_module.yaml", HEAD + b"x: !!python/module:os\n" + RUN, "tag"),
        ("py_in_key.yaml", HEAD + b"!!python/name:os.system : 1\n" + RUN, "tag"),
        ("py_in_run.yaml", HEAD + b"runs:\n  - !!python/object:os.system {}\n", "tag"),
        # Duplicate key hidden behind a different spelling of the same scalar.
        (
            "dup_quoted.yaml",
            HEAD + b"runs:\n  - name: a\n    input: a.json\n    'name': b\n",
            "duplicate",
        ),
        # A 10 MB scalar (under the 16 MiB file limit).
        ("long_scalar.yaml", HEAD + b"app2: " + b"x" * 10_000_000 + b"\n" + RUN, ""),
    ],
    ids=lambda v: v if isinstance(v, str) and v.endswith(".yaml") else "",
)
def test_targeted_hostile_yaml(folder: Path, name: str, data: bytes, needle: str) -> None:
    problems = bounded(folder, data, name)
    assert len(problems) >= 1
    if needle:
        assert any(needle in p.lower() for p in problems), problems


@pytest.mark.slow
def test_node_limit_is_bounded(folder: Path) -> None:
    """2.1 million nodes in 4.2 MB: refused at the 2,000,000-node limit. The loader walks
    libyaml events in Python (a few microseconds per node), so this takes seconds: the
    bound is the node limit, which a 16 MiB file cannot get past. Measured: ~8.5 s and
    ~520 MB peak RSS on the CI machine (docs/reliability.md, row 18)."""
    data = HEAD + b"x: [" + b"1," * 2_100_000 + b"1]\n" + RUN
    problems = bounded(folder, data, "flat_huge.yaml", seconds=30.0, memory=1024 * 1024 * 1024)
    assert any("nodes" in p for p in problems), problems


def test_a_key_with_a_line_break_cannot_forge_error_lines(folder: Path) -> None:
    """Found by test_structured_random_document: a key ending in a line break was shown
    raw (the safe-key regex's `$` matches before a final newline), splitting a problem
    over two lines — and letting a manifest forge a line of batchrun's own output."""
    forged = "x\nm.yaml:1:1: looks fine"
    data = yaml.safe_dump({"version": 1, "app": "x", "defaults": {"0\n": 1, forged: 2}})
    path = folder / "forge.yaml"
    path.write_text(data)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.problems
    for problem in info.value.problems:
        assert "\n" not in problem and problem.startswith(f"{path}:"), problem
