"""Load a manifest: safe YAML → JSON Schema → semantic checks → expanded RunSpecs.

Every problem found is reported at once, in file order, one line each, as
`FILE:LINE:COL: field.path: message (what to do)`; bad input never raises
anything but ManifestError.
"""

from __future__ import annotations

import glob
import math
import os
import re
import stat
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batchrun.errors import ManifestError
from batchrun.manifest_schema import SchemaMemo, make_validator, schema_problems, schema_text
from batchrun.model import (
    DEFAULT_API_KEY_ENV,
    DEFAULT_ENDPOINT,
    EMBEDDED_ENDPOINT,
    MIB,
    EmbeddedSettings,
    Limits,
    Location,
    Manifest,
    RunSpec,
)
from batchrun.yamlsafe import Document, NodePath, Problem, format_path, read_document, show

__all__ = [
    "MANIFEST_MAX_BYTES",
    "human_bytes",
    "load_manifest",
    "make_validator",
    "option_string",
    "parse_duration",
    "schema_text",
]

MANIFEST_MAX_BYTES = 16 * MIB
NAME_MAX_CHARS = 128
DEFAULT_INSTANCE = "latest"
DEFAULT_OUTPUT = "out/{name}.json"
DEFAULT_CONCURRENCY = 8
DEFAULT_TRANSFERS = 4

_GLOB_CHARS = re.compile(r"[*?\[]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def load_manifest(path: Path, *, output_root: Path | None = None) -> Manifest:
    """Read, validate and expand a manifest, or raise ManifestError with every problem."""
    file = str(path)
    doc = read_document(path, file, MANIFEST_MAX_BYTES)
    return _Loader(doc, file, Path(os.path.abspath(path)), output_root).load()


def parse_duration(value: float | int | str) -> float:
    """Seconds from a number or a '1h30m'-style string; ValueError if not positive."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(value)
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not seconds > 0:
        raise ValueError(value)
    return seconds


def option_string(value: str | int | float | bool) -> str:
    """How an option value goes on the wire: JSON-like text for booleans and numbers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)  # str(float) is the shortest round-tripping form


@dataclass
class _Raw:
    """One run entry after defaults are merged, before expansion."""

    index: int
    name: str
    input: str
    app: str | None
    instance: str
    options: dict[str, Any]
    output: str
    output_from: NodePath  # where the output template was written
    description: str | None
    timeout: Any


class _Loader:
    def __init__(self, doc: Document, file: str, manifest_path: Path, root_arg: Path | None):
        self.doc = doc
        self.file = file
        self.path = manifest_path
        self.dir = manifest_path.parent
        self.root_arg = root_arg
        self.problems: list[Problem] = []
        # Nodes the schema rejected, and every ancestor of one: semantic checks
        # skip them rather than trip over data of the wrong shape.
        self.bad: set[NodePath] = set()
        self.tainted: set[NodePath] = set()
        self._realdirs: dict[str, str] = {}

    # -- reporting -------------------------------------------------------------

    def add(self, path: NodePath, message: str, *, at_key: bool = False) -> None:
        line, col = self.doc.key_mark(path) if at_key else self.doc.mark(path)
        self.problems.append(Problem(line, col, format_path(path), message))

    def mark_bad(self, path: NodePath) -> None:
        self.bad.add(path)
        self.tainted.update(path[:n] for n in range(len(path) + 1))

    def _is_bad(self, path: NodePath) -> bool:
        """True if the schema rejected this node, an ancestor or a descendant."""
        return path in self.tainted or any(path[:n] in self.bad for n in range(len(path)))

    # -- settings --------------------------------------------------------------

    def _get(self, key: str, default: Any) -> Any:
        data = self.doc.data
        if self._is_bad((key,)) or key not in data:
            return default
        return data[key]

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        endpoint = str(self._get("endpoint", DEFAULT_ENDPOINT))
        if endpoint != EMBEDDED_ENDPOINT:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                self.add(
                    ("endpoint",),
                    f"{show(endpoint)} is not 'embedded' or an http(s) URL "
                    f"(use e.g. {DEFAULT_ENDPOINT})",
                )
            elif parts.username is not None or parts.password is not None:
                self.add(
                    ("endpoint",),
                    "the URL contains credentials (remove them: the key comes from api_key_env)",
                )
            endpoint = endpoint.rstrip("/")
        out["endpoint"] = endpoint
        limits = self._get("limits", {})
        for key, value in limits.items():
            # .nan slips through the schema's minimum checks (nan <= 0 is false).
            if isinstance(value, float) and not math.isfinite(value):
                self.add(("limits", key), f"must be a finite number, got {value}")
                limits = {}
        base = Limits()
        out["limits"] = Limits(
            runs_per_second=float(limits.get("runs_per_second", base.runs_per_second)),
            results_per_10s=float(limits.get("results_per_10s", base.results_per_10s)),
            requests_per_minute=float(limits.get("requests_per_minute", base.requests_per_minute)),
            direct_input_max_bytes=int(
                limits.get("direct_input_max_bytes", base.direct_input_max_bytes)
            ),
            upload_max_bytes=int(limits.get("upload_max_bytes", base.upload_max_bytes)),
            download_max_bytes=int(limits.get("download_max_bytes", base.download_max_bytes)),
        )
        embedded = self._get("embedded", {})
        apps = tuple(
            (app_id, self._embedded_app(value))
            for app_id, value in embedded.get("apps", {}).items()
        )
        out["embedded"] = EmbeddedSettings(apps=apps, capacity=int(embedded.get("capacity", 4)))
        root = self.root_arg
        if root is not None:
            root = Path(os.path.abspath(root))
        elif "output_root" in self.doc.data and not self._is_bad(("output_root",)):
            value = self.doc.data["output_root"]
            if "\0" in value:
                self.add(("output_root",), "contains a NUL character (remove it)")
            else:
                root = Path(os.path.normpath(self.dir / os.path.expanduser(value)))
        out["output_root"] = root
        return out

    def _embedded_app(self, value: str) -> str:
        if value.startswith("builtin:") or "\0" in value:
            return value
        candidate = self.dir / value
        return str(Path(os.path.normpath(candidate))) if candidate.exists() else value

    # -- runs ------------------------------------------------------------------

    def merged_runs(self) -> list[_Raw]:
        data = self.doc.data
        runs = data.get("runs")
        if ("runs",) in self.bad or not isinstance(runs, list):
            return []
        defaults: dict[str, Any] = data.get("defaults", {})
        if not isinstance(defaults, dict) or self._is_bad(("defaults",)):
            return []  # every run depends on the defaults: their errors come first
        top_app = self._get("app", None)
        out: list[_Raw] = []
        for i, run in enumerate(runs):
            if self._is_bad(("runs", i)):
                continue
            options = dict(defaults.get("options", {}))
            options.update(run.get("options", {}))
            out.append(
                _Raw(
                    index=i,
                    name=run["name"],
                    input=run["input"],
                    app=run.get("app", defaults.get("app", top_app)),
                    instance=run.get("instance", defaults.get("instance", DEFAULT_INSTANCE)),
                    options=options,
                    output=run.get("output", defaults.get("output", DEFAULT_OUTPUT)),
                    output_from=("runs", i, "output")
                    if "output" in run
                    else ("defaults", "output"),
                    description=run.get("description", defaults.get("description")),
                    timeout=run.get("timeout", defaults.get("timeout")),
                )
            )
        return out

    def _template_ok(self, path: NodePath, template: str, allowed: tuple[str, ...]) -> bool:
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError:
            self.add(path, "unbalanced '{' or '}' (write '{{' or '}}' for a literal brace)")
            return False
        for _, fld, spec, conv in parsed:
            if fld is None:
                continue
            if fld not in allowed:
                names = " and ".join("{" + a + "}" for a in allowed)
                self.add(path, f"unknown placeholder {show('{' + fld + '}')} (use {names})")
                return False
            if spec or conv:
                written = "{" + fld + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "")
                self.add(
                    path,
                    f"placeholder {show(written + '}')} cannot have a format (write '{{{fld}}}')",
                )
                return False
        return True

    def expand(self, raws: list[_Raw], limits: Limits, root: Path) -> list[RunSpec]:
        specs: list[RunSpec] = []
        template_ok: dict[tuple[NodePath, str], bool] = {}
        names: dict[str, tuple[int, int]] = {}
        outputs: dict[str, tuple[str, int]] = {}
        root_real = os.path.realpath(root)
        root_label = "output_root" if root != self.dir else "the manifest's folder"
        for raw in raws:
            i = raw.index
            run_path: NodePath = ("runs", i)
            if raw.app is None:
                self.add(
                    run_path, "no app for this run (set 'app' at the top, in defaults or here)"
                )
            ok = self._template_ok((*run_path, "name"), raw.name, ("stem",))
            key = (raw.output_from, raw.output)
            if key not in template_ok:
                template_ok[key] = self._template_ok(raw.output_from, raw.output, ("name", "stem"))
            ok = template_ok[key] and ok
            timeout = None
            if raw.timeout is not None:
                try:
                    timeout = parse_duration(raw.timeout)
                except ValueError:
                    self.add(
                        self._where(raw, "timeout"),
                        "duration must be greater than 0 (use e.g. '90s' or '10m')",
                    )
            files = self._inputs(raw, limits)
            if not ok or raw.app is None:
                continue
            options = tuple(sorted((k, option_string(v)) for k, v in raw.options.items()))
            # Per entry, not per file: a glob entry expands to 10,000 files.
            name_line = self.doc.mark((*run_path, "name"))[0]
            line, col = self.doc.mark(run_path)
            location = Location(self.file, line, col)
            output_where = self._source(raw, "output")
            for display, abs_path, st in files:
                stem = os.path.splitext(os.path.basename(display))[0]
                name = raw.name.format(stem=stem)
                if not self._name_ok((*run_path, "name"), name):
                    continue
                if name in names and names[name][0] == i:
                    self.add(
                        (*run_path, "name"),
                        f"run name {show(name)} repeats for {show(display)} (the glob matches "
                        "several files: put {stem} in the name)",
                    )
                    continue
                if name in names:
                    line = names[name][1]
                    j = names[name][0]
                    self.add(
                        (*run_path, "name"),
                        f"duplicate run name {show(name)} (first used by runs[{j}] at line "
                        f"{line}; make names unique, e.g. with {{stem}})",
                    )
                    continue
                names[name] = (i, name_line)
                out_rel = raw.output.format(name=name, stem=stem)
                out = self._output(output_where, out_rel, root, root_real, root_label)
                if out is None:
                    continue
                real = out[1]
                if real in outputs:
                    first, line = outputs[real]
                    self.add(
                        output_where,
                        f"output {show(out_rel)} of run {show(name)} is also the output of "
                        f"run {show(first)} (line {line}; make outputs unique, e.g. with {{name}})",
                    )
                    continue
                outputs[real] = (name, name_line)
                specs.append(
                    RunSpec(
                        name=name,
                        app=raw.app,
                        instance=raw.instance,
                        input_path=abs_path,
                        input_display=display,
                        options=options,
                        output_path=out[0],
                        description=raw.description,
                        timeout_s=timeout,
                        location=location,
                        input_stat=st,
                    )
                )
        return specs

    def _source(self, raw: _Raw, key: str) -> NodePath:
        """Where a merged field was written: the run itself, else the run entry."""
        run = self.doc.data["runs"][raw.index]
        return ("runs", raw.index, key) if key in run else ("runs", raw.index)

    def _where(self, raw: _Raw, key: str) -> NodePath:
        """Where a merged field was written: the run itself, else defaults."""
        if key in self.doc.data["runs"][raw.index]:
            return ("runs", raw.index, key)
        return ("defaults", key)

    def _name_ok(self, path: NodePath, name: str) -> bool:
        problem = None
        if not name:
            problem = "run name is empty (give the run a name)"
        elif len(name) > NAME_MAX_CHARS:
            problem = (
                f"run name {show(name, 20)} is {len(name):,} characters long, "
                f"at most {NAME_MAX_CHARS} are allowed (shorten it)"
            )
        elif "/" in name or "\\" in name:
            problem = f"run name {show(name)} contains a path separator (use - or _ instead)"
        elif "\0" in name:
            problem = f"run name {show(name)} contains a NUL character (remove it)"
        elif _CONTROL.search(name):
            problem = f"run name {show(name)} contains a control character (remove it)"
        elif name in (".", ".."):
            problem = f"run name {show(name)} is not allowed (pick another name)"
        if problem:
            self.add(path, problem)
        return problem is None

    def _inputs(self, raw: _Raw, limits: Limits) -> list[tuple[str, Path, os.stat_result]]:
        path: NodePath = ("runs", raw.index, "input")
        pattern = raw.input
        if "\0" in pattern:
            self.add(path, "contains a NUL character (remove it)")
            return []
        found: list[tuple[str, Path, os.stat_result]] = []
        if _GLOB_CHARS.search(pattern):
            folder = str(self.dir)
            for match in sorted(glob.glob(pattern, root_dir=folder, recursive=True)):
                # Strings for the syscalls: a Path is built only for a file kept.
                abs_name = os.path.normpath(os.path.join(folder, match))
                try:
                    st = os.stat(abs_name)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and self._input_ok(path, match, st, limits, abs_name):
                    found.append((match, Path(abs_name), st))
            if found or os.path.isfile(self.dir / pattern):
                return found or self._file(path, pattern, limits)
            self.add(
                path,
                f"no file matches {show(pattern)} (check the pattern; it is relative to the "
                "manifest's folder)",
            )
            return []
        return self._file(path, pattern, limits)

    def _file(
        self, path: NodePath, name: str, limits: Limits
    ) -> list[tuple[str, Path, os.stat_result]]:
        abs_path = Path(os.path.normpath(os.path.join(self.dir, os.path.expanduser(name))))
        try:
            st = os.stat(abs_path)
        except FileNotFoundError:
            self.add(
                path,
                f"input file {show(name)} not found (check the path; it is relative to the "
                "manifest's folder)",
            )
            return []
        except OSError as exc:
            self.add(path, f"cannot read input {show(name)}: {exc.strerror} (check the path)")
            return []
        if stat.S_ISDIR(st.st_mode):
            self.add(
                path,
                f"input {show(name)} is a folder (use a glob such as '{name.rstrip('/')}/*.json')",
            )
            return []
        if not stat.S_ISREG(st.st_mode):
            self.add(path, f"input {show(name)} is not a regular file (point it at a file)")
            return []
        if not self._input_ok(path, name, st, limits, abs_path):
            return []
        return [(name, abs_path, st)]

    def _input_ok(
        self, path: NodePath, name: str, st: os.stat_result, limits: Limits, abs_path: Path | str
    ) -> bool:
        if not os.access(abs_path, os.R_OK):
            self.add(path, f"input {show(name)} is not readable (check its permissions)")
            return False
        if st.st_size > limits.upload_max_bytes:
            self.add(
                path,
                f"input {show(name)} is {_size_text(st.st_size)}, above "
                f"the upload limit of {human_bytes(limits.upload_max_bytes)} "
                "(split the input or raise limits.upload_max_bytes)",
            )
            return False
        return True

    def _output(
        self, where: NodePath, rel: str, root: Path, root_real: str, root_label: str
    ) -> tuple[Path, str] | None:
        if "\0" in rel:
            self.add(where, "output contains a NUL character (remove it)")
            return None
        if rel.endswith(("/", "\\")):
            self.add(where, f"output {show(rel)} names a folder (end it with a file name)")
            return None
        lexical = os.path.normpath(os.path.join(root, os.path.expanduser(rel)))
        parent, base = os.path.split(lexical)
        real_parent = self._realdirs.get(parent)
        if real_parent is None:
            # Symlinks in the parents decide where the file really lands; one
            # realpath per distinct folder keeps 10,000 runs cheap.
            real_parent = self._realdirs[parent] = os.path.realpath(parent)
        real = os.path.join(real_parent, base)
        if not real.startswith(root_real.rstrip(os.sep) + os.sep):
            fix = "keep outputs inside it" + (
                "" if root_label == "output_root" else ", or set output_root"
            )
            self.add(where, f"output {show(rel)} is outside {root_label} ({fix})")
            return None
        try:
            st = os.lstat(real)
        except OSError:
            return Path(lexical), real
        if stat.S_ISLNK(st.st_mode):
            self.add(
                where,
                f"output {show(rel)} is a symlink (remove it: outputs are never "
                "written through links)",
            )
            return None
        if stat.S_ISDIR(st.st_mode):
            self.add(where, f"output {show(rel)} is a folder (name a file)")
            return None
        return Path(lexical), real

    # -- all together ----------------------------------------------------------

    def check_schema(self) -> None:
        memo = SchemaMemo(self.path.parent / ".batchrun" / f"{self.path.stem}.schema-ok")
        result = schema_problems(self.doc, memo)
        self.problems.extend(result.problems)
        for path in result.bad:
            self.mark_bad(path)

    def load(self) -> Manifest:
        self.check_schema()
        if () in self.bad:
            raise self._error()
        cfg = self.settings()
        root = cfg["output_root"] or self.dir
        specs = self.expand(self.merged_runs(), cfg["limits"], root)
        if self.problems:
            raise self._error()
        data = self.doc.data
        return Manifest(
            path=self.path,
            version=int(data["version"]),
            endpoint=cfg["endpoint"],
            api_key_env=str(data.get("api_key_env", DEFAULT_API_KEY_ENV)),
            concurrency=int(data.get("concurrency", DEFAULT_CONCURRENCY)),
            transfers=int(data.get("transfers", DEFAULT_TRANSFERS)),
            limits=cfg["limits"],
            runs=tuple(specs),
            embedded=cfg["embedded"],
            output_root=cfg["output_root"],
        )

    def _error(self) -> ManifestError:
        ordered = sorted(self.problems, key=lambda p: (p.line, p.col))
        # A problem in defaults shows up once, not once per run inheriting it.
        return ManifestError(list(dict.fromkeys(p.format(self.file) for p in ordered)))


def _size_text(n: int) -> str:
    return f"{n:,} bytes" if n < 1000 else f"{human_bytes(n)} ({n:,} bytes)"


def human_bytes(n: int) -> str:
    """Decimal units, as the service states its limits (500 MB, 100 MB)."""
    if n < 1000:
        return f"{n} bytes"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 999.95:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} TB"
