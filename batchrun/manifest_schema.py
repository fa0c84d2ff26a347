"""The manifest's JSON Schema: loading it, validating against it, wording its errors.

Split from manifest.py, which does the checks a schema cannot express.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrun import __version__
from batchrun.yamlsafe import Document, NodePath, Problem, format_path, show

if TYPE_CHECKING:
    # jsonschema (~50 ms to import) is loaded only when a document is checked:
    # a manifest that passed before, unchanged, is not checked again (SchemaMemo).
    from jsonschema import Draft202012Validator  # type: ignore[import-untyped,unused-ignore]
    from jsonschema.exceptions import ValidationError  # type: ignore[import-untyped,unused-ignore]
    from referencing import Resource

_SCHEMA_NAME = "manifest.schema.json"
_SCHEMA = "schemas/" + _SCHEMA_NAME
_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}
_EXAMPLES = {
    "version": "version: 1",
    "app": "app: my-app",
    "endpoint": "endpoint: embedded",
    "api_key_env": "api_key_env: NEXTMV_API_KEY",
    "concurrency": "concurrency: 8",
    "transfers": "transfers: 4",
    "limits": "limits: {runs_per_second: 5}",
    "runs_per_second": "runs_per_second: 5",
    "results_per_10s": "results_per_10s: 200",
    "requests_per_minute": "requests_per_minute: 2000",
    "direct_input_max_bytes": "direct_input_max_bytes: 5242880",
    "upload_max_bytes": "upload_max_bytes: 500000000",
    "download_max_bytes": "download_max_bytes: 100000000",
    "output_root": "output_root: results",
    "embedded": "embedded: {apps: {my-app: builtin:echo}}",
    "apps": "apps: {my-app: builtin:echo}",
    "capacity": "capacity: 4",
    "defaults": "defaults: {instance: latest}",
    "runs": "runs: [{name: a, input: a.json}]",
    "name": "name: run-1",
    "input": "input: inputs/a.json",
    "instance": "instance: latest",
    "options": "options: {solve.duration: 10s}",
    "output": "output: out/{name}.json",
    "description": "description: nightly batch",
    "timeout": "timeout: 10m",
}


def schema_text() -> str:
    """The manifest JSON Schema, as shipped inside the package."""
    try:
        return resources.files("batchrun").joinpath(_SCHEMA).read_text("utf-8")
    except OSError:
        # An editable install made before batchrun/__init__.py existed maps the
        # package as a namespace, which importlib.resources cannot read from.
        return Path(__file__).with_name("schemas").joinpath(_SCHEMA_NAME).read_text("utf-8")


def _refuse_retrieval(uri: str) -> Resource[Any]:
    # A schema $ref to a URL must never turn validation into a network fetch
    # (reliability row 20): every reference has to live in the schema itself.
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(uri)  # type: ignore[call-arg,unused-ignore]


def make_validator(schema: Mapping[str, Any]) -> Draft202012Validator:
    from jsonschema import Draft202012Validator
    from referencing import Registry

    registry: Registry[Any] = Registry(retrieve=_refuse_retrieval)  # type: ignore[call-arg]
    return Draft202012Validator(schema, registry=registry)


@cache
def _validator() -> Draft202012Validator:
    return make_validator(json.loads(schema_text()))


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"string {show(value, 30)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, dict):
        return "a mapping"
    return "a list"


def _field_name(path: NodePath) -> str:
    for part in reversed(path):
        if isinstance(part, str):
            return part
    return ""


_RUN_STRINGS = {"name": 1, "input": 1, "app": 1, "instance": 1, "output": 1, "description": 0}
_DURATION_RE = re.compile(r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$")


def _plain_run_ok(run: Any) -> bool:
    """A cheap check that implies the schema's `run` definition holds.

    jsonschema costs about 0.1 ms per run; with 10,000 runs that alone would
    blow the 1 s plan budget. Runs passing this check cannot produce schema
    errors, so only the others go through jsonschema (which words the errors).
    tests/test_manifest.py checks this stays no looser than the schema.
    """
    if not isinstance(run, dict) or "name" not in run or "input" not in run:
        return False
    for key, value in run.items():
        min_len = _RUN_STRINGS.get(key)
        if min_len is not None:
            if type(value) is not str or len(value) < min_len:
                return False
        elif key == "options":
            if type(value) is not dict:
                return False
            for v in value.values():
                if type(v) not in (str, int, float, bool):
                    return False
        elif key == "timeout":
            if type(value) in (int, float):
                if not value > 0:
                    return False
            elif type(value) is not str or not _DURATION_RE.match(value):
                return False
        else:
            return False
    return True


def _shadow(data: dict[str, Any]) -> tuple[dict[str, Any], list[int] | None]:
    """The document with only the runs that need jsonschema, and their indices."""
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        return data, None
    index = [i for i, run in enumerate(runs) if not _plain_run_ok(run)] or [0]
    return {**data, "runs": [runs[i] for i in index]}, index


@dataclass
class _Result:
    doc: Document
    problems: list[Problem] = field(default_factory=list)
    bad: set[NodePath] = field(default_factory=set)

    def add(self, path: NodePath, message: str, *, at_key: bool = False) -> None:
        line, col = self.doc.key_mark(path) if at_key else self.doc.mark(path)
        self.problems.append(Problem(line, col, format_path(path), message))

    def mark_bad(self, path: NodePath) -> None:
        self.bad.add(path)


class SchemaMemo:
    """Remembers the last document that passed the schema, so an unchanged
    manifest is not checked (nor jsonschema imported) again.

    Keyed by sha256 of the document's data, the schema and batchrun's version;
    only a clean result is remembered, so a hit means exactly what running the
    check would. It is only a cache: unreadable or unwritable, it costs time.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @staticmethod
    def key(data: Any) -> str | None:
        try:
            text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
        except (TypeError, ValueError):
            return None
        digest = hashlib.sha256(f"{__version__}\n".encode())
        digest.update(_schema_digest().encode())
        digest.update(text.encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    def holds(self, key: str | None) -> bool:
        if key is None or self.path is None:
            return False
        try:
            return self.path.read_text("ascii").strip() == key
        except (OSError, ValueError):
            return False

    def remember(self, key: str | None) -> None:
        if key is None or self.path is None:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".schema-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(key + "\n")
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


@cache
def _schema_digest() -> str:
    return hashlib.sha256(schema_text().encode("utf-8")).hexdigest()


def schema_problems(doc: Document, memo: SchemaMemo | None = None) -> _Result:
    """Schema errors as Problems, plus the paths they reject."""
    res = _Result(doc)
    key = memo.key(doc.data) if memo is not None else None
    if memo is not None and memo.holds(key):
        return res
    _check(res)
    if memo is not None and not res.problems:
        memo.remember(key)
    return res


def _check(res: _Result) -> None:
    data = res.doc.data
    if not isinstance(data, dict):
        res.add(
            (),
            f"the manifest must be a mapping, got {_describe(data)} (start with 'version: 1')",
        )
        res.mark_bad(())
        return
    seen: set[tuple[NodePath, str]] = set()
    shadow, index = _shadow(data)
    for err in _validator().iter_errors(shadow):
        path = list(err.absolute_path)
        if index is not None and len(path) >= 2 and path[0] == "runs":
            path[1] = index[path[1]]
        _schema_error(res, err, tuple(path), seen)


def _schema_error(
    res: _Result, err: ValidationError, path: NodePath, seen: set[tuple[NodePath, str]]
) -> None:
    kind = str(err.validator)
    inst = err.instance
    field = _field_name(path)
    example = _EXAMPLES.get(field)
    hint = f" (write e.g. '{example}')" if example else ""
    if kind == "additionalProperties" and isinstance(inst, dict):
        known = sorted(err.schema.get("properties", {}))
        for key in inst:
            if key in known or ((path, key) in seen):
                continue
            seen.add((path, key))
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            fix = f"did you mean {show(close[0])}?" if close else f"known: {', '.join(known)}"
            # Not marked bad: an unknown key is never read, so the entry's
            # other checks still run and every problem shows in one pass.
            res.add((*path, key), f"unknown field ({fix})", at_key=True)
        return
    if kind == "required" and isinstance(inst, dict):
        for key in err.validator_value:
            if key not in inst and (path, key) not in seen:
                seen.add((path, key))
                res.mark_bad((*path, key))
                ex = _EXAMPLES.get(key)
                fix = f"add e.g. '{ex}'" if ex else "add it"
                line, col = res.doc.mark(path)
                label = format_path((*path, key))
                res.problems.append(Problem(line, col, label, f"missing required field ({fix})"))
        return
    res.mark_bad(path)
    if len(path) >= 2 and path[-2] == "options" and kind == "type":
        msg = (
            f"option values must be a string, number or boolean, got {_describe(inst)} "
            "(quote it to send it as text)"
        )
    elif kind == "type":
        expected = err.validator_value
        names = [expected] if isinstance(expected, str) else list(expected)
        msg = f"expected {' or '.join(_TYPE_NAMES[n] for n in names)}, got {_describe(inst)}"
        msg += hint
    elif kind == "const" and field == "version":
        msg = f"must be 1, got {_describe(inst)} (this batchrun reads 'version: 1')"
    elif kind == "minimum":
        msg = f"must be at least {err.validator_value}, got {_describe(inst)}{hint}"
    elif kind == "exclusiveMinimum":
        msg = f"must be greater than {err.validator_value}, got {_describe(inst)}{hint}"
    elif kind == "minLength":
        msg = f"must not be empty{hint}"
    elif kind == "minItems" and field == "runs":
        msg = "no runs (add at least one entry with a name and an input)"
    elif kind == "pattern" and field == "api_key_env":
        msg = f"{show(inst)} is not an environment variable name (use letters, digits and _)"
    elif field == "timeout":
        msg = f"invalid duration {_describe(inst)} (use seconds, or e.g. '90s', '10m', '1h30m')"
    else:  # pragma: no cover - every keyword the schema uses is handled above
        msg = err.message
    res.add(path, msg)
