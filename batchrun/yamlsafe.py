"""Hostile-input-safe YAML → plain data, with the line:col of every node.

PyYAML's composer is recursive (deep nesting can exhaust the C or Python
stack), keeps the last of duplicate keys silently, and materialises aliases
only lazily, so an alias bomb blows up whatever walks the data later. This
module therefore composes the document itself, iteratively, from libyaml's
event stream (the fast part of CSafeLoader), enforcing a depth cap, a node
budget, an alias-expansion budget, duplicate-key detection and a tag
whitelist, and keeping marks keyed by the node's path for error messages.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import ScalarNode
from yaml.resolver import Resolver

from batchrun.errors import ManifestError
from batchrun.model import MIB

PathPart = str | int
NodePath = tuple[PathPart, ...]

MAX_DEPTH = 64  # a manifest needs about 5 levels; libyaml itself stops at 1000
ALIAS_NODES_LIMIT = 100_000  # nodes added by alias expansion (billion laughs guard)
NODES_LIMIT = 2_000_000  # all nodes: bounds memory of a huge-but-flat file

# Only the loaders' event parsers are used (libyaml's when available, it is
# about 20x faster); their composers and constructors never run.
_EventParser: Any = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader

_DEPTH_MESSAGE = f"nesting deeper than {MAX_DEPTH} levels (a manifest needs only a few)"
_TAG_PREFIX = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (
    _TAG_PREFIX + t for t in ("str", "int", "float", "bool", "null")
)
_SEQ_TAGS = frozenset({None, "!", _TAG_PREFIX + "seq"})
_MAP_TAGS = frozenset({None, "!", _TAG_PREFIX + "map"})
_SCALAR_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL})
_IMPLICIT = Resolver.yaml_implicit_resolvers
_CONSTRUCTOR = SafeConstructor()
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True, order=True)
class Problem:
    """One manifest problem; sorts in file order."""

    line: int
    col: int
    path: str
    message: str

    def format(self, file: str) -> str:
        where = f"{file}:{self.line}:{self.col}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


@dataclass
class Document:
    """Plain data plus where each node (and each mapping key) starts, 1-based."""

    data: Any
    marks: dict[NodePath, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[NodePath, tuple[int, int]] = field(default_factory=dict)

    def mark(self, path: NodePath) -> tuple[int, int]:
        # Nodes reached through an alias have no marks of their own: the
        # nearest marked ancestor (the alias itself) is the useful place.
        while path not in self.marks and path:
            path = path[:-1]
        return self.marks.get(path, (1, 1))

    def key_mark(self, path: NodePath) -> tuple[int, int]:
        return self.key_marks.get(path) or self.mark(path)


def format_path(path: NodePath) -> str:
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif _SAFE_KEY.fullmatch(part):
            out.append(f".{part}" if out else part)
        else:
            out.append(f"[{show(part)}]")
    return "".join(out)


def show(value: object, limit: int = 60) -> str:
    """A one-line, quoted, length-capped rendering of user data for messages."""
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    out: list[str] = []
    for ch in text[:limit]:
        if ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:  # control characters, NUL, line breaks: keep the message on one line
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
    return "'" + "".join(out) + ("…'" if cut else "'")


def _fail(line: int, col: int, message: str, path: str = "") -> _Fatal:
    return _Fatal(Problem(line, col, path, message))


class _Fatal(ManifestError):
    """A problem that stops composition; formatted with the file name by read_document."""

    def __init__(self, problem: Problem) -> None:
        super().__init__([problem.message])
        self.problem = problem


def read_text(path: Path, file: str, max_bytes: int) -> str:
    """The manifest's text, refusing huge, non-regular and non-UTF-8 files cheaply."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ManifestError([f"{file}: is a folder, not a manifest file (name the YAML file)"])
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError([f"{file}: not a regular file (name the YAML file)"])
        if st.st_size > max_bytes:
            raise ManifestError([_too_big(file, st.st_size, max_bytes)])
        with open(path, "rb") as f:
            # The file may grow between stat and read: never read more than the cap.
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ManifestError([f"{file}: no such file (check the manifest path)"]) from None
    except OSError as exc:
        raise ManifestError([f"{file}: cannot read: {exc.strerror} (check the path)"]) from None
    if len(raw) > max_bytes:
        raise ManifestError([_too_big(file, len(raw), max_bytes)])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        col = len(raw[line_start : exc.start].decode("utf-8", "replace")) + 1
        bad = raw[exc.start]
        raise ManifestError(
            [f"{file}:{line}:{col}: not valid UTF-8 (byte 0x{bad:02x}); save the file as UTF-8"]
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _too_big(file: str, size: int, max_bytes: int) -> str:
    return (
        f"{file}: the manifest is {size:,} bytes, above the {max_bytes // MIB} MiB limit "
        "(use globs or fewer runs per manifest)"
    )


def read_document(path: Path, file: str, max_bytes: int) -> Document:
    """Read and compose one YAML document; raises ManifestError with one formatted line."""
    text = read_text(path, file, max_bytes)
    try:
        return _Composer(text).compose()
    except _Fatal as exc:
        raise ManifestError([exc.problem.format(file)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = exc.problem or exc.context or "syntax error"
        msg = f"invalid YAML: {problem} (check the quoting and indentation here)"
        if "nesting depth" in problem:  # libyaml's own cap (1000), hit while scanning ahead
            msg = _DEPTH_MESSAGE
        raise ManifestError([Problem(line, col, "", msg).format(file)]) from None
    except yaml.YAMLError as exc:  # ReaderError: a character YAML forbids
        pos = getattr(exc, "position", 0) or 0
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = getattr(exc, "character", None)
        what = f"U+{ord(char):04X}" if isinstance(char, str) else f"U+{char or 0:04X}"
        msg = f"character {what} is not allowed in YAML (remove it or write it as an escape)"
        raise ManifestError([Problem(line, col, "", msg).format(file)]) from None


@dataclass
class _Frame:
    container: dict[str, Any] | list[Any]
    path: NodePath
    anchor: str | None
    start_nodes: int
    start_aliased: int
    key: str | None = None
    key_mark: tuple[int, int] = (0, 0)


class _Composer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.doc = Document(None)
        self.anchors: dict[str, tuple[Any, int] | None] = {}
        self.nodes = 0
        self.aliased = 0

    def _events(self) -> Iterator[Any]:
        parser = _EventParser(self.text)
        try:
            while parser.check_event():
                yield parser.get_event()
        finally:
            parser.dispose()

    def compose(self) -> Document:
        stack: list[_Frame] = []
        docs = 0
        root_set = False
        marks = self.doc.marks
        for ev in self._events():
            cls = type(ev)
            if cls is yaml.ScalarEvent:
                mark = (ev.start_mark.line + 1, ev.start_mark.column + 1)
                top = stack[-1] if stack else None
                if top is not None and isinstance(top.container, dict) and top.key is None:
                    self._key(top, ev, mark)
                    continue
                value = self._scalar(ev, mark, top)
                self._count(1, mark)
                path = self._place(stack, value, mark)
                if ev.anchor is not None:
                    self.anchors[ev.anchor] = (value, 1)
                if path is None:
                    root_set = True
            elif cls is yaml.MappingStartEvent or cls is yaml.SequenceStartEvent:
                mark = (ev.start_mark.line + 1, ev.start_mark.column + 1)
                top = stack[-1] if stack else None
                if top is not None and isinstance(top.container, dict) and top.key is None:
                    raise _fail(*mark, "complex mapping keys are not supported (use a plain key)")
                is_map = cls is yaml.MappingStartEvent
                if ev.tag not in (_MAP_TAGS if is_map else _SEQ_TAGS):
                    raise _fail(*mark, _tag_message(ev.tag), self._child_label(top))
                if len(stack) >= MAX_DEPTH:
                    raise _fail(*mark, _DEPTH_MESSAGE)
                path = self._child_path(top)
                marks[path] = mark
                self._count(1, mark)
                container: dict[str, Any] | list[Any] = {} if is_map else []
                if ev.anchor is not None:
                    self.anchors[ev.anchor] = None  # open: an alias to it is recursive
                stack.append(_Frame(container, path, ev.anchor, self.nodes, self.aliased))
            elif cls is yaml.MappingEndEvent or cls is yaml.SequenceEndEvent:
                frame = stack.pop()
                if frame.anchor is not None:
                    size = self.nodes - frame.start_nodes + 1 + self.aliased - frame.start_aliased
                    self.anchors[frame.anchor] = (frame.container, size)
                mark = marks[frame.path]
                if self._place(stack, frame.container, mark, new_node=False) is None:
                    root_set = True
            elif cls is yaml.AliasEvent:
                mark = (ev.start_mark.line + 1, ev.start_mark.column + 1)
                top = stack[-1] if stack else None
                if top is not None and isinstance(top.container, dict) and top.key is None:
                    raise _fail(*mark, "aliases as mapping keys are not supported (write the key)")
                label = self._child_label(top)
                if ev.anchor not in self.anchors:
                    raise _fail(
                        *mark, f"unknown alias '*{ev.anchor}' (define '&{ev.anchor}' first)", label
                    )
                target = self.anchors[ev.anchor]
                if target is None:
                    raise _fail(
                        *mark,
                        f"alias '*{ev.anchor}' is inside its own anchor (remove the recursion)",
                        label,
                    )
                value, size = target
                self.aliased += size
                if self.aliased > ALIAS_NODES_LIMIT:
                    raise _fail(
                        *mark,
                        f"aliases expand to more than {ALIAS_NODES_LIMIT:,} nodes "
                        "(write the data out, or use 'defaults' to share settings)",
                        label,
                    )
                self._count(0, mark)
                if self._place(stack, value, mark) is None:
                    root_set = True
            elif cls is yaml.DocumentStartEvent:
                docs += 1
                if docs > 1:
                    line = ev.start_mark.line + 1
                    raise _fail(line, 1, "more than one YAML document (keep one manifest per file)")
        if not root_set:
            raise _fail(1, 1, "the manifest is empty (start with 'version: 1')")
        return self.doc

    def _count(self, n: int, mark: tuple[int, int]) -> None:
        self.nodes += n
        if self.nodes + self.aliased > NODES_LIMIT:
            raise _fail(*mark, f"more than {NODES_LIMIT:,} YAML nodes (split the manifest)")

    @staticmethod
    def _child_path(top: _Frame | None) -> NodePath:
        if top is None:
            return ()
        if isinstance(top.container, dict):
            assert top.key is not None
            return (*top.path, top.key)
        return (*top.path, len(top.container))

    def _child_label(self, top: _Frame | None) -> str:
        return format_path(self._child_path(top))

    def _place(
        self, stack: list[_Frame], value: Any, mark: tuple[int, int], new_node: bool = True
    ) -> NodePath | None:
        """Put a finished node into its parent; None when it is the document root."""
        if not stack:
            self.doc.data = value
            self.doc.marks[()] = mark
            return None
        top = stack[-1]
        if isinstance(top.container, dict):
            key = top.key
            assert key is not None
            top.container[key] = value
            path = (*top.path, key)
            self.doc.key_marks[path] = top.key_mark
            top.key = None
        else:
            path = (*top.path, len(top.container))
            top.container.append(value)
        if new_node:
            self.doc.marks[path] = mark
        return path

    def _key(self, top: _Frame, ev: Any, mark: tuple[int, int]) -> None:
        key = ev.value
        if ev.tag not in (None, "!", _STR):
            raise _fail(*mark, _tag_message(ev.tag), format_path(top.path))
        if ev.anchor is not None:
            self.anchors[ev.anchor] = (key, 1)
        if key == "<<" and ev.implicit[0]:
            raise _fail(
                *mark,
                "merge keys (<<) are not supported (use 'defaults' to share settings)",
                format_path(top.path),
            )
        assert isinstance(top.container, dict)
        if key in top.container:
            line, col = self.doc.key_marks[(*top.path, key)]
            first = f"line {line}" + (f", column {col}" if line == mark[0] else "")
            raise _fail(
                *mark,
                f"duplicate key (first at {first}; keep one)",
                format_path((*top.path, key)),
            )
        top.key = key
        top.key_mark = mark
        self._count(1, mark)

    def _scalar(self, ev: Any, mark: tuple[int, int], top: _Frame | None) -> Any:
        tag, value = ev.tag, ev.value
        if tag is None or tag == "!":
            if tag == "!" or not ev.implicit[0]:
                return value
            tag = _implicit_tag(value)
            if tag not in _SCALAR_TAGS:
                return value  # timestamps, '=' and '<<' stay text: JSON has no such types
        elif tag not in _SCALAR_TAGS:
            raise _fail(*mark, _tag_message(tag), self._child_label(top))
        node = ScalarNode(tag, value)
        try:
            if tag == _STR:
                return value
            if tag == _INT:
                return _CONSTRUCTOR.construct_yaml_int(node)
            if tag == _FLOAT:
                return _CONSTRUCTOR.construct_yaml_float(node)
            if tag == _BOOL:
                return _CONSTRUCTOR.construct_yaml_bool(node)
            return None
        except (ValueError, KeyError, ConstructorError):
            kind = tag.removeprefix(_TAG_PREFIX)
            raise _fail(
                *mark,
                f"{show(value)} is not a valid !!{kind} (remove the tag or fix the value)",
                self._child_label(top),
            ) from None


def _implicit_tag(value: str) -> str:
    for tag, regexp in _IMPLICIT.get(value[:1], []):
        if regexp.match(value):
            return str(tag)
    return _STR


def _tag_message(tag: str | None) -> str:
    shown = "!!" + tag.removeprefix(_TAG_PREFIX) if tag and tag.startswith(_TAG_PREFIX) else tag
    return f"unsupported tag {show(shown or '')} (remove it: only plain data is allowed)"
