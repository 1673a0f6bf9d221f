"""``silo.toml``: a workspace spec as a file, with errors that point at ``FILE:LINE:COL``.

Like Windows Sandbox's ``.wsb``, but it says everything ``silo create`` can say::

    name = "web"                 # required here or as NAME on the command line
    isolation = "process"        # process (default) | vm | app (NOT a security boundary)
    root = "host"                # host (default) | /abs/image/dir | a template name
    disposable = false           # true: the private layer lives in RAM, gone on stop
    encrypted = false            # true (vm only): its disks encrypted at rest with the daemon's key
    diskless = false             # true (vm only): in its VM's locked RAM only; implies disposable
    kernel = "auto"              # vm only: auto | host | debian | /abs/path/vmlinuz (modules/ beside)
    workdir = "/work"
    user = "1000:1000"           # or a number
    hostname = "web"
    on_start = ["sh", "-c", "echo hi"]
    restart = "on-failure"       # no (default) | on-failure | always

    [env]
    LANG = "C.UTF-8"

    [[mount]]                    # one table per mapped folder ...
    source = "/srv/data"
    target = "/data"
    readonly = true
    # ... or mount = ["/srv/data:/data:ro"], the -v form

    [limits]
    memory = "512M"              # or a number of bytes
    cpus = 1.5
    pids = 256

    [network]
    mode = "none"                # the only mode so far

Any TOML spelling of the same data works (dotted keys, inline tables). Values go
through :meth:`silo.model.workspace.WorkspaceSpec.from_dict`, the same reader as
records and API bodies, so a file accepts exactly what the SDK accepts.

Positions. ``tomllib`` reports syntax errors with a line and column (reformatted here)
but says nothing about where a *value* is, so :func:`scan_positions` re-reads the source
(only after ``tomllib`` accepted it) and maps each key path, like
``("mount", 1, "source")``, to the line and column of its key and of its value. It
follows ``[table]`` and ``[[array]]`` headers, dotted and quoted keys, inline tables,
arrays (each element gets its index) and all four string forms. Limits: an error about a
whole table points at its header, one about a missing key at the table that lacks it,
and a rule across fields (no single key to blame) at 1:1; a key whose position cannot
be found falls back to its nearest enclosing table.
"""

from __future__ import annotations

import ast
import os
import re
import tomllib
from dataclasses import dataclass, field

from silo.model.errors import NotFoundError, SpecError
from silo.model.workspace import FieldError, FieldPath, Overrides, WorkspaceSpec, format_path, parse_name

MAX_BYTES = 1 << 20  # a spec is a few lines; refuse to parse a disk image by mistake

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR = re.compile(r"[^,\]}#\r\n]+")
_TOML_ERROR = re.compile(r"^(?P<msg>.*?) \((?:at line (?P<line>\d+), column (?P<col>\d+)|at end of document)\)$",
                         re.DOTALL)


class SpecFileError(SpecError):
    """An error in a spec file; ``message`` is ``FILE:LINE:COL: what is wrong and what to do``."""

    def __init__(self, filename: str, line: int, col: int, detail: str) -> None:
        super().__init__(f"{filename}:{line}:{col}: {detail}")
        self.filename = filename
        self.line = line
        self.col = col
        self.detail = detail


def load(path: str | os.PathLike[str], overrides: Overrides | None = None) -> WorkspaceSpec:
    """Read a ``silo.toml`` and lay ``overrides`` (the command line's values) over it."""
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise NotFoundError(f"{filename}: no such spec file") from None
    except OSError as e:
        raise SpecError(f"{filename}: cannot read it: {e.strerror}") from None
    if len(data) > MAX_BYTES:
        raise SpecFileError(filename, 1, 1, f"the file is larger than {MAX_BYTES >> 20} MiB: is it a spec file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-8")  # valid up to the first bad byte
        line, col = _line_col(before, len(before))
        raise SpecFileError(filename, line, col, "the file is not UTF-8 text") from None
    return loads(text, filename, overrides)


def loads(text: str, filename: str = "silo.toml", overrides: Overrides | None = None) -> WorkspaceSpec:
    """Parse spec text; every error in it is a :class:`SpecFileError` with its position.

    Errors in ``overrides`` are plain SpecErrors: they are the command line's, not the file's.
    """
    data = _parse_toml(text, filename)
    name = None
    if overrides is not None and overrides.name is not None:
        name = parse_name(overrides.name)  # blamed on the command line, not on the file's name
    try:
        spec = WorkspaceSpec.from_dict(data, name=name)
    except FieldError as e:
        detail = e.detail
        if e.path == ("name",) and e.at_key:
            detail += " to the file, or give a name on the command line"
        line, col = line_col(text, e.path, at_key=e.at_key)
        raise SpecFileError(filename, line, col, detail) from None
    return overrides.apply(spec) if overrides is not None else spec


def _parse_toml(text: str, filename: str) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = _TOML_ERROR.match(str(e))
        if not match:
            raise SpecFileError(filename, 1, 1, str(e)) from None
        msg = match["msg"]
        if match["line"]:
            line, col = int(match["line"]), int(match["col"])
        else:
            line, col = _line_col(text, len(text))
        detail = msg[:1].lower() + msg[1:]
        if msg == "Invalid value":
            detail += ' (strings need quotes, like isolation = "process")'
        elif msg == "Cannot overwrite a value":
            # tomllib says where it noticed (often the end), not where the key is
            duplicate = scan_positions(text).duplicate
            if duplicate is not None:
                path, offset = duplicate
                line, col = _line_col(text, offset)
                detail = f"{format_path(path)} is set twice: keep one"
        elif declared := re.fullmatch(r"Cannot declare (\(.*\)) twice", msg):
            try:
                table = ".".join(ast.literal_eval(declared[1]))
                detail = f"[{table}] is declared twice: merge the two tables"
                # tomllib points past the header; the header starts its line
                lines = text.split("\n")
                if line <= len(lines):
                    col = len(lines[line - 1]) - len(lines[line - 1].lstrip()) + 1
            except (ValueError, SyntaxError, TypeError):
                pass
        raise SpecFileError(filename, line, col, detail) from None


# -- positions -----------------------------------------------------------------------------


@dataclass
class Positions:
    """Where each key path's key and value start, as character offsets into the source."""

    keys: dict[FieldPath, int] = field(default_factory=dict)
    values: dict[FieldPath, int] = field(default_factory=dict)
    duplicate: tuple[FieldPath, int] | None = None  # the first key set twice, at its second setting


class _ScanError(Exception):
    """The scanner met text it does not understand (only possible on text tomllib refused)."""


def scan_positions(text: str) -> Positions:
    """Map key paths of valid TOML ``text`` to offsets (see the module docstring's limits)."""
    scanner = _Scanner(text)
    try:
        scanner.scan()
    except (_ScanError, IndexError):
        pass  # keep what was found: lookups fall back to enclosing tables, then to 1:1
    return scanner.pos


def line_col(text: str, path: FieldPath, *, at_key: bool = False) -> tuple[int, int]:
    """The 1-based line and column of a key path's value (or key) in ``text``; 1:1 if unknown."""
    pos = scan_positions(text)
    table = pos.keys if at_key else pos.values
    while path:
        if path in table:
            return _line_col(text, table[path])
        if path in pos.values:
            return _line_col(text, pos.values[path])
        path = path[:-1]
    return 1, 1


def _line_col(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of ``offset``, counted as tomllib counts."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


class _Scanner:
    """A reader of TOML structure only: keys, headers and value extents, no value decoding."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.pos = Positions()
        self.arrays: dict[FieldPath, int] = {}  # [[array]] path -> index of its current table

    def scan(self) -> None:
        table: FieldPath = ()
        text = self.text
        while True:
            self._skip_blank()
            if self.i >= len(text):
                return
            start = self.i
            if text.startswith("[[", self.i):
                self.i += 2
                table = self._header(self._key(), start, array=True)
                self._expect("]]")
            elif text.startswith("[", self.i):
                self.i += 1
                table = self._header(self._key(), start, array=False)
                self._expect("]")
            else:
                self._keyval(table)
            self._skip_ws()
            if text.startswith("#", self.i):
                self._skip_comment()
            if self.i < len(text) and text[self.i] not in "\r\n":
                raise _ScanError(self.i)

    def _skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i] in " \t":
            self.i += 1

    def _skip_comment(self) -> None:
        end = self.text.find("\n", self.i)
        self.i = len(self.text) if end < 0 else end

    def _skip_blank(self) -> None:
        """Whitespace, newlines and comments (between statements and inside arrays)."""
        while True:
            self._skip_ws()
            if self.text.startswith("#", self.i):
                self._skip_comment()
            elif self.i < len(self.text) and self.text[self.i] in "\r\n":
                self.i += 1
            else:
                return

    def _expect(self, token: str) -> None:
        self._skip_ws()
        if not self.text.startswith(token, self.i):
            raise _ScanError(self.i)
        self.i += len(token)

    def _key(self) -> list[tuple[str, int]]:
        """A dotted key: its parts, each with the offset where it starts."""
        parts = []
        while True:
            self._skip_ws()
            start = self.i
            char = self.text[self.i]
            if char == '"':
                self._basic_string()
                name = str(tomllib.loads("k = " + self.text[start:self.i])["k"])
            elif char == "'":
                self._literal_string()
                name = self.text[start + 1:self.i - 1]
            else:
                match = _BARE_KEY.match(self.text, self.i)
                if not match:
                    raise _ScanError(self.i)
                name, self.i = match.group(), match.end()
            parts.append((name, start))
            self._skip_ws()
            if not self.text.startswith(".", self.i):
                return parts
            self.i += 1

    def _header(self, key: list[tuple[str, int]], start: int, *, array: bool) -> FieldPath:
        """The path a ``[table]`` or ``[[array]]`` header opens, array indexes included."""
        path: list[str | int] = []
        for depth, (name, offset) in enumerate(key):
            path.append(name)
            if array and depth == len(key) - 1:
                self.arrays[tuple(path)] = self.arrays.get(tuple(path), -1) + 1
            self._mark(tuple(path), offset, start)
            if tuple(path) in self.arrays:
                path.append(self.arrays[tuple(path)])
                self._mark(tuple(path), offset, start)
        return tuple(path)

    def _mark(self, path: FieldPath, key: int, value: int) -> None:
        self.pos.keys.setdefault(path, key)
        self.pos.values.setdefault(path, value)

    def _keyval(self, table: FieldPath) -> None:
        key = self._key()
        path = table
        for name, offset in key:
            path = (*path, name)
            self.pos.keys.setdefault(path, offset)
        if path in self.pos.values and self.pos.duplicate is None:
            self.pos.duplicate = (path, key[-1][1])
        self._expect("=")
        self._skip_ws()
        self._value(path)

    def _value(self, path: FieldPath) -> None:
        self.pos.values.setdefault(path, self.i)
        text, start = self.text, self.i
        if text.startswith('"', start):
            self._basic_string()
        elif text.startswith("'", start):
            self._literal_string()
        elif text.startswith("[", start):
            self.i += 1
            index = 0
            while True:
                self._skip_blank()
                if text.startswith("]", self.i):
                    self.i += 1
                    return
                self._value((*path, index))
                index += 1
                self._skip_blank()
                if text.startswith(",", self.i):
                    self.i += 1
        elif text.startswith("{", start):
            self.i += 1
            self._skip_ws()
            while not text.startswith("}", self.i):
                self._keyval(path)
                self._skip_ws()
                if text.startswith(",", self.i):
                    self.i += 1
                    self._skip_ws()
            self.i += 1
        else:  # number, bool, date: up to a delimiter (a date may hold a space)
            match = _SCALAR.match(text, start)
            if not match:
                raise _ScanError(start)
            self.i = match.end()

    def _basic_string(self) -> None:
        text = self.text
        triple = text.startswith('"""', self.i)
        self.i += 3 if triple else 1
        while True:
            char = text[self.i]
            if char == "\\":
                self.i += 2
            elif triple and text.startswith('"""', self.i):
                self.i += 3
                for _ in range(2):  # up to two quotes may end the content: """a"""""
                    if text.startswith('"', self.i):
                        self.i += 1
                return
            elif char == '"' and not triple:
                self.i += 1
                return
            elif char == "\n" and not triple:
                raise _ScanError(self.i)
            else:
                self.i += 1

    def _literal_string(self) -> None:
        text = self.text
        if text.startswith("'''", self.i):
            end = text.find("'''", self.i + 3)
            if end < 0:
                raise _ScanError(self.i)
            self.i = end + 3
            for _ in range(2):
                if text.startswith("'", self.i):
                    self.i += 1
            return
        end = text.find("'", self.i + 1)
        if end < 0 or "\n" in text[self.i:end]:
            raise _ScanError(self.i)
        self.i = end + 1
