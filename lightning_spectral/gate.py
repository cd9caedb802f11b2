"""Threshold rules over logged runs: the engine of ``lightning-spectral check`` and SpectralAlarm.

A rule is ``TAG_PATTERN [REDUCER] OP VALUE``::

    vne/encoder.* >= 2.0
    collapse/nc1 last < 0.5
    erank/* min > 4
    weight_stable_rank/fc2 mean(last=5) <= 30

* ``TAG_PATTERN`` is a shell-style glob (``*``, ``?``, ``[...]``; ``*`` also crosses ``/``);
  it expands to one check per matching scalar tag.
* ``REDUCER`` turns a tag's series (ordered by step) into one number: ``last`` (the default),
  ``first``, ``min``, ``max``, ``mean``, or ``mean(last=K)`` (mean of the last ``K`` values).
* ``OP`` is one of ``< <= > >= == !=``; ``VALUE`` a number (``inf`` and ``-inf`` allowed).

A NaN reduced value fails every operator (a gate treats a NaN metric as a failure); NaN
propagates through ``min``, ``max`` and ``mean``. Runs are read by :func:`read_run` with every
logged value counted (no sampling). This module only compares what was logged (docs/gate.md).
Only the standard library and NumPy are imported here, so the command line starts fast.

Hostile input is bad input, never a hang or a crash: only regular files and directories are
read (FIFOs, sockets and devices inside a run are skipped with a warning in ``Run.warnings``),
every unreadable, malformed or out-of-range input raises a :class:`GateInputError` naming the
file, and reports escape control characters (and GitHub workflow-command syntax) in tags.
Matching, evaluation and reporting cost time linear in the number of rules and tags.
"""

from __future__ import annotations

import bisect
import csv
import decimal
import difflib
import fnmatch
import json
import math
import os
import re
import stat
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_spectral._eventfile import file_kind, open_regular
from lightning_spectral.errors import SpectralConfigError, SpectralError
from lightning_spectral.reduce import reduce_values

__all__ = [
    "Rule",
    "Run",
    "CheckResult",
    "GateReport",
    "GateInputError",
    "RuleSyntaxError",
    "RunReadError",
    "NoMatchingTagError",
    "parse_rule",
    "load_rules",
    "read_run",
    "evaluate",
    "check",
    "REDUCERS",
    "OPS",
    "printable",
]

REDUCERS: tuple[str, ...] = ("last", "first", "min", "max", "mean")
OPS: dict[str, Any] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


# --------------------------------------------------------------------------- errors


class GateInputError(SpectralError, ValueError):
    """Bad input to the gate (a rule, a rules file or a run); the CLI exits with status 2.

    ``str(error)`` is one line that names the rule, tag or file at fault.
    """


class RuleSyntaxError(GateInputError, SpectralConfigError):
    """A malformed rule; ``column`` is the 1-based position of the problem in ``rule``."""

    def __init__(self, rule: str, column: int, expected: str, source: str | None = None) -> None:
        self.rule = rule
        self.column = column
        self.expected = expected
        self.source = source
        found = rule[column - 1 :].strip()
        where = f" ({source})" if source else ""
        super().__init__(
            f"malformed rule {rule!r}{where}: {expected} at column {column}"
            + (f", found {found!r}" if found else ", found the end of the rule")
        )

    def pointer(self) -> str:
        """The rule with a caret under the faulty position (two lines)."""
        return f"  {self.rule}\n  {' ' * (self.column - 1)}^"


class RunReadError(GateInputError):
    """A run could not be read (missing, empty, unreadable or corrupt); names the file."""


class NoMatchingTagError(GateInputError):
    """A non-optional rule matched no tag; the message lists the nearest existing tags."""


# --------------------------------------------------------------------------- safe text

# C0/C1 controls, line/paragraph separators, bidirectional overrides, BOM, surrogates (from
# undecodable file names) and the XML non-characters: shown escaped, never raw
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                      "\u2066-\u2069\ufeff\ufffe\uffff\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match) -> str:
    c = match.group(0)
    code = ord(c)
    return _NAMED.get(c) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(text: object) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``, ``\\u2028``, ...): one line,
    safe for a terminal, a CI log and XML 1.0."""
    text = str(text)
    return _CONTROL.sub(_escape_char, text) if _CONTROL.search(text) else text


def _no_commands(line: str) -> str:
    """A log line that a CI runner cannot take for a workflow command (``::cmd::`` at the start
    of a line, ``##[cmd]`` anywhere): the first ':' or the '[' is written escaped."""
    if "##[" in line:
        line = line.replace("##[", "##\\x5b")
    stripped = line.lstrip()
    if stripped.startswith("::"):
        at = len(line) - len(stripped)
        line = line[:at] + "\\x3a" + line[at + 1 :]
    return line


def safe_line(text: object) -> str:
    """One printable line that is not a workflow command (for stderr and text reports)."""
    return _no_commands(printable(text))


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """One parsed rule: ``pattern reducer op threshold`` (see the module docstring)."""

    text: str
    pattern: str
    reducer: str = "last"
    window: int | None = None
    op: str = "<"
    threshold: float = 0.0
    optional: bool = False
    name: str | None = None
    source: str | None = None  # "file.toml:LINE" when read from a rules file

    @property
    def reducer_label(self) -> str:
        return f"mean(last={self.window})" if self.window is not None else self.reducer

    @property
    def label(self) -> str:
        return self.name or self.text

    def reduce(self, values: np.ndarray) -> float:
        """Apply the reducer to a series (ordered by step, one value per step); NaN for an empty
        series (:func:`lightning_spectral.reduce.reduce_values`)."""
        return reduce_values(values, self.reducer, self.window)

    def compare(self, value: float) -> bool:
        """``value OP threshold``; False whenever ``value`` is NaN."""
        if math.isnan(value):
            return False
        return bool(OPS[self.op](value, self.threshold))

    def matches(self, tag: str) -> bool:
        return fnmatch.fnmatchcase(tag, self.pattern)


_WS = re.compile(r"\s*")
_PATTERN = re.compile(r"[^\s<>=!]+")
_REDUCER = re.compile(r"(last|first|min|max|mean)\b(?!/)")
_WINDOW = re.compile(r"\s*\(\s*last\s*=\s*")
_PAREN = re.compile(r"\s*\(")
_INT = re.compile(r"[0-9]+")
_CLOSE = re.compile(r"\s*\)")
_OP = re.compile(r"<=|>=|==|!=|<|>")
_NUMBER = re.compile(r"[+-]?(?:inf(?:inity)?|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)",
                     re.IGNORECASE)


def parse_rule(text: str, *, optional: bool = False, name: str | None = None,
               source: str | None = None) -> Rule:
    """Parse ``TAG_PATTERN [REDUCER] OP VALUE`` into a :class:`Rule`.

    Raises :class:`RuleSyntaxError` (with the 1-based column of the problem) when malformed.
    """
    if not isinstance(text, str):
        raise RuleSyntaxError(str(text), 1, "a rule must be a string", source)
    rule = text
    pos = _WS.match(rule, 0).end()

    def fail(at: int, expected: str) -> RuleSyntaxError:
        return RuleSyntaxError(rule, at + 1, expected, source)

    m = _PATTERN.match(rule, pos)
    if not m:
        raise fail(pos, "expected a tag pattern such as 'vne/*'")
    pattern = m.group(0)
    pos = _WS.match(rule, m.end()).end()
    reducer, window = "last", None
    m = _REDUCER.match(rule, pos)
    if m:
        reducer = m.group(1)
        pos = m.end()
        w = _WINDOW.match(rule, pos)
        if w:
            if reducer != "mean":
                raise fail(_WS.match(rule, pos).end(),
                           f"only 'mean' takes a window, not {reducer!r}")
            pos = w.end()
            k = _INT.match(rule, pos)
            if not k or len(k.group(0).lstrip("0")) > 18 or int(k.group(0)) < 1:
                raise fail(pos, "expected a positive integer K (at most 18 digits) in "
                                "mean(last=K)")
            window = int(k.group(0))
            c = _CLOSE.match(rule, k.end())
            if not c:
                raise fail(_WS.match(rule, k.end()).end(), "expected ')' closing mean(last=K)")
            pos = c.end()
        elif _PAREN.match(rule, pos):
            raise fail(_WS.match(rule, pos).end(), "expected 'mean(last=K)'")
        pos = _WS.match(rule, pos).end()
    m = _OP.match(rule, pos)
    if not m:
        if pos < len(rule) and rule[pos].isalpha():
            raise fail(pos, f"expected a reducer ({', '.join(REDUCERS)}, mean(last=K)) "
                            "or an operator (< <= > >= == !=)")
        raise fail(pos, "expected an operator (< <= > >= == !=)")
    op = m.group(0)
    pos = _WS.match(rule, m.end()).end()
    m = _NUMBER.match(rule, pos)
    if not m:
        raise fail(pos, "expected a number")
    end = m.end()
    if end < len(rule) and not rule[end].isspace():
        raise fail(pos, "expected a number")
    threshold = float(m.group(0))
    rest = _WS.match(rule, end).end()
    if rest != len(rule):
        raise fail(rest, "expected the end of the rule")
    return Rule(text=rule.strip(), pattern=pattern, reducer=reducer, window=window, op=op,
                threshold=threshold, optional=bool(optional), name=name, source=source)


def _as_rules(rules: str | Rule | Iterable[str | Rule] | Mapping[str, Any]) -> list[Rule]:
    if isinstance(rules, (str, Rule)):
        rules = [rules]
    out: list[Rule] = []
    for r in rules:
        if isinstance(r, Rule):
            out.append(r)
        elif isinstance(r, str):
            out.append(parse_rule(r))
        elif isinstance(r, Mapping):
            out.append(_rule_from_table(r, None, None))
        else:
            raise GateInputError(f"a rule must be a string or a Rule, got {type(r).__name__}")
    return out


def _rule_from_table(table: Mapping[str, Any], source: str | None, text: str | None) -> Rule:
    unknown = sorted(set(table) - {"check", "optional", "name"})
    where = f"{source}: " if source else ""
    if unknown:
        raise GateInputError(f"{where}unknown key(s) {', '.join(unknown)} in [[rule]] "
                             "(allowed: check, optional, name)")
    if "check" not in table or not isinstance(table["check"], str):
        raise GateInputError(f"{where}[[rule]] needs check = \"TAG_PATTERN [REDUCER] OP VALUE\"")
    optional = table.get("optional", False)
    if not isinstance(optional, bool):
        raise GateInputError(f"{where}optional must be true or false, got {optional!r}")
    name = table.get("name")
    if name is not None and not isinstance(name, str):
        raise GateInputError(f"{where}name must be a string, got {name!r}")
    return parse_rule(table["check"], optional=optional, name=name, source=source)


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


# A scan of (valid) TOML that finds where each [[rule]] table and its `check` key sit: one
# regular-expression match per statement; strings are matched whole, so a rule's text repeated
# in a comment, a name or a multi-line string never looks like a key or a header. Arrays and
# inline tables are tokenised (they may nest and span lines).
_TOML_STRING = (r'"{3}(?:[^"\\]|\\.|"(?!""))*"{3}(?:""?)?'  # multi-line basic
                r"|'{3}(?:[^']|'(?!''))*'{3}(?:''?)?"  # multi-line literal
                r'|"(?:[^"\\\n]|\\.)*"'  # basic
                r"|'[^'\n]*'")  # literal
_TOML_KEY_PART = r"""[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'"""
_TOML_KEY = rf"(?:{_TOML_KEY_PART})(?:[ \t]*\.[ \t]*(?:{_TOML_KEY_PART}))*"
# whitespace and comments, matched in exactly one way (a comment runs to the end of its line),
# so that no input can make the matcher backtrack exponentially
_TOML_BLANK = r"(?:[ \t\r\n]|#[^\n]*(?![^\n]))*"
_TOML_SKIP = re.compile(_TOML_BLANK)
_TOML_STATEMENT = re.compile(
    rf"\[(?P<array>\[)?[ \t]*(?P<table>{_TOML_KEY})[ \t]*\]\]?"
    rf"|(?P<key>{_TOML_KEY})[ \t]*=[ \t]*(?:{_TOML_STRING}|(?P<open>[\[{{])|[^\s#\[{{\"'][^\n#]*)",
    re.DOTALL)
_TOML_TOKEN = re.compile(  # one token of an array or inline table (after _TOML_SKIP)
    rf"(?P<string>{_TOML_STRING})|(?P<punct>[\[\]{{}}=,])|(?P<bare>[^ \t\r\n#=,\[\]{{}}\"']+)",
    re.DOTALL)
_TOML_PARTS = re.compile(_TOML_KEY_PART)
_TOML_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))", re.DOTALL)
_TOML_SIMPLE = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b",
                '"': '"', "\\": "\\"}


def _toml_key(text: str) -> list[str]:
    """The parts of a (dotted, possibly quoted) TOML key."""
    if _TOML_BARE_KEY.fullmatch(text):
        return [text]
    parts = []
    for part in _TOML_PARTS.findall(text):
        if part[0] == "'":
            part = part[1:-1]
        elif part[0] == '"':
            part = _TOML_ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16))
                                    if m.group(3) is None else _TOML_SIMPLE.get(m.group(3), ""),
                                    part[1:-1])
        parts.append(part)
    return parts


def _toml_nested(text: str, start: int, line: int, entries: list[list[int]] | None) -> int:
    """Skip the array or inline table opening at ``start`` (on line ``line``); return the offset
    after it. With ``entries``, the value is ``rule = [...]``: append ``[line, check line]``
    for each inline table in it."""
    depth = 0
    pos = last = start
    expect_key = False
    key: list[str] = []
    key_line = line
    while True:
        at = _TOML_SKIP.match(text, pos).end()
        m = _TOML_TOKEN.match(text, at)
        if m is None:
            raise ValueError(f"unexpected TOML at offset {at}")
        pos = m.end()
        line += text.count("\n", last, at)
        last = at
        punct = m.group("punct")
        if punct in ("[", "{"):
            depth += 1
            if entries is not None and punct == "{" and depth == 2:
                entries.append([line, 0])
                expect_key, key = True, []
        elif punct in ("]", "}"):
            depth -= 1
            if depth == 0:
                return m.end()
        elif entries is not None and depth == 2 and entries:
            if punct == ",":
                expect_key, key = True, []
            elif punct == "=" and expect_key:
                if key == ["check"] and not entries[-1][1]:
                    entries[-1][1] = key_line
                expect_key = False
            elif expect_key and punct is None:  # a part of the key (bare or quoted)
                if not key:
                    key_line = line
                key += _toml_key(m.group(0))


def _rule_lines(text: str) -> list[int]:
    """For each ``rule`` table, in order, the 1-based line of its ``check`` key (or of the
    table itself when it has none): ``[[rule]]`` tables and ``rule = [{...}, ...]`` arrays of
    inline tables. ``text`` must be valid TOML (tomllib gives no positions). Linear in the
    size of the text."""
    out: list[list[int]] = []
    section: list[str] = []  # the current table ([] is the root)
    entry: list[int] | None = None  # [header line, check line] of the current [[rule]]
    pos, last, line, n = 0, 0, 1, len(text)
    while True:
        pos = _TOML_SKIP.match(text, pos).end()
        if pos >= n:
            break
        m = _TOML_STATEMENT.match(text, pos)
        if m is None:  # pragma: no cover - valid TOML always matches
            raise ValueError(f"unexpected TOML at offset {pos}")
        line += text.count("\n", last, pos)
        last = pos
        if m.group("table") is not None:
            section = _toml_key(m.group("table"))
            entry = None
            if m.group("array") and section == ["rule"]:
                entry = [line, 0]
                out.append(entry)
            pos = m.end()
            continue
        key = _toml_key(m.group("key"))
        if entry is not None and key == ["check"] and not entry[1]:
            entry[1] = line
        if m.group("open") is None:
            pos = m.end()
            continue
        inline = not section and key == ["rule"] and m.group("open") == "["
        pos = _toml_nested(text, m.start("open"), line, out if inline else None)
    return [check or header for header, check in out]


def load_rules(path: str | Path) -> list[Rule]:
    """Read a TOML rules file: one ``[[rule]]`` table per rule.

    Each table has ``check = "TAG_PATTERN [REDUCER] OP VALUE"`` and optionally
    ``optional = true`` (no error when nothing matches) and ``name = "..."``. Every rule
    remembers ``file:line`` (the line of its ``check`` key) for error messages and GitHub
    annotations. Only a regular file is read (a FIFO or device is refused, never opened).
    """
    path = Path(path)
    try:
        with open_regular(path) as handle:
            raw = handle.read()
        text = raw.decode("utf-8-sig")
    except OSError as exc:
        raise GateInputError(f"{path}: cannot read rules file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise GateInputError(f"{path}: cannot read rules file (not UTF-8: {exc.reason} at "
                             f"byte {exc.start})") from exc
    except ValueError as exc:  # e.g. an embedded NUL in the path
        raise GateInputError(f"{path}: cannot read rules file ({exc})") from exc
    try:
        data = _toml_loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise GateInputError(f"{path}: invalid TOML ({exc})") from exc
    except RecursionError:
        raise GateInputError(f"{path}: invalid TOML (nested too deeply)") from None
    tables = data.get("rule")
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise GateInputError(f"{path}: unknown top-level key(s) {', '.join(unknown)} "
                             "(expected [[rule]] tables)")
    if not isinstance(tables, list) or not tables:
        raise GateInputError(f"{path}: no [[rule]] tables (each needs check = \"...\")")
    try:
        lines: Sequence[int | None] = _rule_lines(text)
    except (ValueError, IndexError):  # pragma: no cover - a layout the scan does not know
        lines = []
    if len(lines) != len(tables):  # pragma: no cover
        lines = [None] * len(tables)
    out = []
    for i, (table, line) in enumerate(zip(tables, lines, strict=True), 1):
        source = f"{path}:{line}" if line else f"{path} rule {i}"
        if not isinstance(table, dict):
            raise GateInputError(f"{source}: rule {i} is not a [[rule]] table")
        out.append(_rule_from_table(table, source, table.get("check")))
    return out


# --------------------------------------------------------------------------- runs


@dataclass
class Series:
    """One tag's logged values, sorted by step, one value per step (the latest write)."""

    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Run:
    """The scalars of one run: ``{tag: Series}`` plus where they were read from."""

    scalars: dict[str, Series]
    label: str = "run"
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what was skipped or ignored, and why

    @property
    def tags(self) -> list[str]:
        return sorted(self.scalars)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], label: str = "run") -> Run:
        """``{tag: values}`` (steps 0..n-1) or ``{tag: (steps, values)}`` -> Run."""
        scalars = {}
        for tag, item in data.items():
            if isinstance(item, Series):
                scalars[tag] = item
                continue
            if isinstance(item, tuple) and len(item) == 2:
                steps = np.asarray(item[0], dtype=np.int64)
                values = np.asarray(item[1], dtype=np.float64)
            else:
                values = np.atleast_1d(np.asarray(item, dtype=np.float64))
                steps = np.arange(len(values), dtype=np.int64)
            scalars[str(tag)] = _dedupe(steps, values)
        return cls(scalars=scalars, label=label)


def _dedupe(steps: np.ndarray, values: np.ndarray) -> Series:
    """Sort by step; of several values given for one step keep the last one."""
    order = np.lexsort((np.arange(len(steps)), steps))
    s, v = steps[order], values[order]
    keep = np.ones(len(s), dtype=bool)
    keep[:-1] = s[1:] != s[:-1]
    return Series(steps=s[keep], values=v[keep])


_EVENTS_PREFIX = "events.out.tfevents"


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _list_dir(directory: Path) -> list[os.DirEntry]:
    """The entries of ``directory`` sorted by name (OSError when it cannot be listed)."""
    with os.scandir(directory) as entries:
        return sorted(entries, key=lambda e: e.name)


def _is_real_dir(entry: os.DirEntry) -> bool:
    """A sub-directory to search (symbolic links to directories are not followed)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


class _Candidates:
    """What a directory walk found: event files by directory, metrics.csv files, what it
    skipped (special files, with a warning) and the directories it could not list."""

    def __init__(self, warnings: list[str]) -> None:
        self.events: dict[Path, list[Path]] = {}
        self.csvs: list[Path] = []
        self.skipped: list[str] = []
        self.unreadable: list[tuple[Path, OSError]] = []
        self.warnings = warnings

    def add(self, directory: Path, entry: os.DirEntry) -> None:
        name = entry.name
        is_events = name.startswith(_EVENTS_PREFIX)
        if not is_events and name != "metrics.csv":
            return
        path = directory / name
        try:
            mode = os.stat(path).st_mode  # follows a symbolic link to a file
        except OSError as exc:
            self._skip(path, f"cannot access ({_reason(exc)})")
            return
        if stat.S_ISDIR(mode):
            return
        if not stat.S_ISREG(mode):
            self._skip(path, f"not a regular file ({file_kind(mode)})")
            return
        if is_events:
            self.events.setdefault(directory, []).append(path)
        else:
            self.csvs.append(path)

    def _skip(self, path: Path, why: str) -> None:
        self.skipped.append(f"{path}: {why}")
        self.warnings.append(f"{path}: skipped, {why}")


def _read_directory(path: Path, label: str, warnings: list[str]) -> Run:
    try:
        top = _list_dir(path)
    except OSError as exc:
        raise RunReadError(f"{path}: cannot list directory ({_reason(exc)})") from exc
    here = _Candidates(warnings)
    for entry in top:
        here.add(path, entry)
    if path in here.events:
        return _read_event_dir(path, here.events[path], label, warnings)
    if here.csvs:
        return _read_csv(here.csvs[0], label, warnings)
    # a Lightning layout: the run sits in one sub-directory (links to directories not followed)
    found = _Candidates(warnings)
    found.skipped = here.skipped
    stack = [path / e.name for e in reversed(top) if _is_real_dir(e)]
    while stack:
        directory = stack.pop()
        try:
            entries = _list_dir(directory)
        except OSError as exc:
            found.unreadable.append((directory, exc))
            continue
        for entry in entries:
            found.add(directory, entry)
        stack.extend(directory / e.name for e in reversed(entries) if _is_real_dir(e))
    if found.unreadable:
        directory, exc = found.unreadable[0]
        more = (f" (and {len(found.unreadable) - 1} more)" if len(found.unreadable) > 1
                else "")
        raise RunReadError(f"{directory}: cannot list directory ({_reason(exc)}){more}; "
                           f"cannot tell which run under {path} to read")
    holders = sorted(found.events)
    if len(holders) == 1:
        return _read_event_dir(holders[0], found.events[holders[0]], label, warnings)
    if len(holders) > 1:
        shown = ", ".join(str(h) for h in holders[:5]) + (" ..." if len(holders) > 5 else "")
        raise RunReadError(f"{path}: holds several runs ({shown}); pass one of them")
    csvs = sorted(found.csvs)
    if len(csvs) == 1:
        return _read_csv(csvs[0], label, warnings)
    if len(csvs) > 1:
        raise RunReadError(f"{path}: holds several metrics.csv files "
                           f"({', '.join(str(c) for c in csvs[:5])}); pass one of them")
    skipped = f"; skipped {'; '.join(found.skipped[:3])}" if found.skipped else ""
    raise RunReadError(f"{path}: no TensorBoard event files or metrics.csv (empty run"
                       f"{skipped})")


def _read_event_dir(directory: Path, files: list[Path], label: str,
                    warnings: list[str] | None = None) -> Run:
    from lightning_spectral._eventfile import EventFileError, read_scalars

    warnings = [] if warnings is None else warnings
    loaded = []
    for path in sorted(files):
        try:
            rec = read_scalars(path, allow_truncated=True)
        except EventFileError as exc:
            raise RunReadError(f"{exc.path}: unreadable event file: {exc.reason}") from exc
        if rec.truncated_at is not None:
            warnings.append(f"{path}: ignored an incomplete last record at byte "
                            f"{rec.truncated_at} (file is {rec.file_size} bytes: still being "
                            "written, or cut short)")
        loaded.append((path, rec))
    # later files win: order by the wall time of their first event, then by name
    loaded.sort(key=lambda item: (
        item[1].first_wall_time if not math.isnan(item[1].first_wall_time) else math.inf,
        item[0].name))
    names: dict[str, int] = {}
    ids, steps, values = [], [], []
    offset = 0
    for _path, rec in loaded:
        remap = np.array([names.setdefault(t, len(names)) for t in rec.tags], dtype=np.int64)
        ids.append(remap[rec.tag_ids] if len(rec.tags) else rec.tag_ids)
        steps.append(rec.steps)
        values.append(rec.values)
        offset += len(rec.values)
    if offset == 0:
        raise RunReadError(f"{directory}: the event files hold no scalar values "
                           f"({', '.join(p.name for p in files)})")
    tag_ids = np.concatenate(ids)
    step = np.concatenate(steps)
    value = np.concatenate(values)
    # sort by (tag, step, write order) and keep the last write of each (tag, step). Common case:
    # steps already increase within each tag, so a stable (radix) sort by tag is enough.
    small = tag_ids.astype(np.int16) if len(names) < 2**15 else tag_ids
    order = np.argsort(small, kind="stable")
    s_tag, s_step = tag_ids[order], step[order]
    same = s_tag[1:] == s_tag[:-1]
    if not np.all(s_step[1:][same] > s_step[:-1][same]):
        order = np.lexsort((np.arange(len(step)), step, tag_ids))
    tag_ids, step, value = tag_ids[order], step[order], value[order]
    keep = np.ones(len(step), dtype=bool)
    keep[:-1] = (tag_ids[1:] != tag_ids[:-1]) | (step[1:] != step[:-1])
    tag_ids, step, value = tag_ids[keep], step[keep], value[keep]
    bounds = np.flatnonzero(np.diff(tag_ids)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(tag_ids)]])
    tags = list(names)
    scalars = {tags[int(tag_ids[a])]: Series(step[a:b], value[a:b])
               for a, b in zip(starts.tolist(), ends.tolist(), strict=True)}
    return Run(scalars=scalars, label=label, files=[str(p) for p, _ in loaded],
               warnings=warnings)


_INT64 = 1 << 63


def _csv_step(cell: str, where: str) -> int:
    """The exact integer step of a CSV cell; a fraction, a non-finite or an out-of-range value
    is refused (``where`` is ``file:line``)."""
    if not cell:
        raise RunReadError(f"{where}: column 'step' is empty in a row with values")
    try:
        step = int(cell)
    except ValueError:
        try:
            exact = decimal.Decimal(cell)
        except decimal.InvalidOperation:
            raise RunReadError(f"{where}: column 'step' value {cell!r} is not a number"
                               ) from None
        if not exact.is_finite():
            raise RunReadError(f"{where}: column 'step' value {cell!r} is not finite") from None
        if exact.adjusted() > 18:
            raise RunReadError(f"{where}: column 'step' value {cell!r} is out of range "
                               "(steps are 64-bit integers)") from None
        if exact != exact.to_integral_value():
            raise RunReadError(f"{where}: column 'step' value {cell!r} is not a whole number"
                               ) from None
        step = int(exact)
    if not -_INT64 <= step < _INT64:
        raise RunReadError(f"{where}: column 'step' value {cell!r} is out of range (steps "
                           "are 64-bit integers)")
    return step


def _read_csv(path: Path, label: str, warnings: list[str] | None = None) -> Run:
    try:
        handle = open_regular(path, "r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise RunReadError(f"{path}: cannot read ({_reason(exc)})") from exc
    columns: dict[str, tuple[list[int], list[float]]] = {}
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise RunReadError(f"{path}: empty metrics file") from None
        except (csv.Error, UnicodeDecodeError, OSError) as exc:
            raise RunReadError(f"{path}: not a CSV file ({_reason(exc)})") from exc
        header = [h.strip() for h in header]
        first: dict[str, int] = {}
        for j, name in enumerate(header):
            if name in first and name:
                raise RunReadError(f"{path}:{reader.line_num}: column {name!r} appears twice "
                                   f"(columns {first[name] + 1} and {j + 1}); cannot tell "
                                   "which one to read")
            first.setdefault(name, j)
        step_col = first.get("step")
        try:
            for row_no, row in enumerate(reader):
                line = reader.line_num
                if not row:
                    continue
                if len(row) > len(header):
                    raise RunReadError(f"{path}:{line}: {len(row)} cells but {len(header)} "
                                       "columns in the header")
                cells = [(j, c.strip()) for j, c in enumerate(row) if j != step_col]
                cells = [(j, c) for j, c in cells if c]
                if not cells:
                    continue
                step = row_no
                if step_col is not None:
                    cell = row[step_col].strip() if step_col < len(row) else ""
                    step = _csv_step(cell, f"{path}:{line}")
                for j, cell in cells:
                    if not header[j]:
                        raise RunReadError(f"{path}:{line}: value {cell!r} in column {j + 1}, "
                                           "which has no name in the header")
                    try:
                        value = float(cell)
                    except ValueError:
                        raise RunReadError(f"{path}:{line}: column {header[j]!r} value "
                                           f"{cell!r} is not a number") from None
                    col = columns.setdefault(header[j], ([], []))
                    col[0].append(step)
                    col[1].append(value)
        except (csv.Error, UnicodeDecodeError, OSError) as exc:
            raise RunReadError(f"{path}: not a readable CSV file ({_reason(exc)})") from exc
    if not columns:
        raise RunReadError(f"{path}: no logged values (empty run)")
    scalars = {
        tag: _dedupe(np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
        for tag, (s, v) in columns.items()
    }
    return Run(scalars=scalars, label=label, files=[str(path)],
               warnings=[] if warnings is None else warnings)


def read_run(path: str | Path, label: str | None = None) -> Run:
    """Read every scalar of a run.

    ``path`` is a Lightning log version directory, any directory holding TensorBoard event
    files, a directory whose event files all sit in one sub-directory, or a CSVLogger
    ``metrics.csv`` (the file or its directory). Several event files are merged by step,
    ordered by the wall time of their first event: a step written twice (as after a resumed
    run) keeps the latest write. Steps an interrupted run wrote beyond the point a resumed run
    reached are kept, as TensorBoard shows them.

    Only regular files and directories are read: a FIFO, socket or device named like an
    event file or ``metrics.csv`` inside the run is skipped, and an event file's incomplete
    last record (a file still being written) is ignored; both are reported in
    ``Run.warnings``. Raises :class:`RunReadError` naming the file for anything missing,
    empty, unreadable, corrupt or out of range.
    """
    path = Path(path)
    label = label or str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise RunReadError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise RunReadError(f"{path}: cannot access ({_reason(exc)})") from exc
    except ValueError as exc:  # an embedded NUL
        raise RunReadError(f"{path}: invalid path ({exc})") from exc
    warnings: list[str] = []
    if stat.S_ISREG(mode):
        if path.name.startswith(_EVENTS_PREFIX):
            return _read_event_dir(path.parent, [path], label, warnings)
        return _read_csv(path, label, warnings)
    if stat.S_ISDIR(mode):
        return _read_directory(path, label, warnings)
    raise RunReadError(f"{path}: not a regular file or directory ({file_kind(mode)})")


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one rule on one tag of one run (``status`` pass / fail / skip)."""

    run: str
    rule: Rule
    tag: str
    value: float
    status: str
    n_values: int = 0
    last_step: int | None = None

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    def as_dict(self) -> dict[str, Any]:
        finite = self.value if math.isfinite(self.value) else None
        return {
            "run": self.run,
            "rule": self.rule.text,
            "name": self.rule.name,
            "source": self.rule.source,
            "tag": self.tag,
            "reducer": self.rule.reducer_label,
            "value": finite if finite is not None else _nonfinite(self.value),
            "op": self.rule.op,
            "threshold": self.rule.threshold if math.isfinite(self.rule.threshold)
            else _nonfinite(self.rule.threshold),
            "status": self.status,
            "passed": self.passed,
            "n_values": self.n_values,
            "last_step": self.last_step,
        }


def _nonfinite(x: float) -> str | None:
    if math.isnan(x):
        return None
    return "inf" if x > 0 else "-inf"


def _nearest(pattern: str, tags: Sequence[str], k: int = 5) -> list[str]:
    literal = pattern.replace("*", "").replace("?", "")
    near = difflib.get_close_matches(pattern, tags, n=k, cutoff=0.4)
    for t in difflib.get_close_matches(literal, tags, n=k, cutoff=0.4):
        if t not in near:
            near.append(t)
    if not near:  # fall back to tags sharing the quantity prefix, then the first few
        prefix = pattern.split("/")[0]
        near = [t for t in tags if t.split("/")[0] == prefix][:k] or list(tags[:k])
    return near[:k]


_GLOB_CHARS = re.compile(r"[*?\[]")


class _TagIndex:
    """The sorted tags of a run, for matching many patterns in time linear in the rules:
    a literal pattern is one dictionary look-up; a glob is tried only on the tags that share
    its literal prefix (a contiguous slice of the sorted tags, found by bisection)."""

    def __init__(self, tags: list[str]) -> None:
        self.tags = tags
        self.known = set(tags)
        self.cache: dict[str, list[str]] = {}

    def matching(self, pattern: str) -> list[str]:
        hit = self.cache.get(pattern)
        if hit is not None:
            return hit
        glob = _GLOB_CHARS.search(pattern)
        if glob is None:
            hit = [pattern] if pattern in self.known else []
        else:
            prefix = pattern[: glob.start()]
            tags = self.tags
            i = bisect.bisect_left(tags, prefix)
            hit = []
            while i < len(tags) and tags[i].startswith(prefix):
                if fnmatch.fnmatchcase(tags[i], pattern):
                    hit.append(tags[i])
                i += 1
        self.cache[pattern] = hit
        return hit


def evaluate(run: Run, rules: Sequence[Rule]) -> list[CheckResult]:
    """Check every rule against ``run`` (one result per matching tag, in tag order).

    Raises :class:`NoMatchingTagError` for a non-optional rule that matches no tag; an
    optional one gives a single ``skip`` result. Time is linear in the number of rules plus
    the number of checks (a pattern is matched once; a reduction is computed once per tag).
    """
    index = _TagIndex(run.tags)
    reduced: dict[tuple[str, str, int | None], float] = {}
    results: list[CheckResult] = []
    for rule in rules:
        matched = index.matching(rule.pattern)
        if not matched:
            if rule.optional:
                results.append(CheckResult(run.label, rule, rule.pattern, float("nan"), "skip"))
                continue
            near = _nearest(rule.pattern, index.tags)
            where = f" ({rule.source})" if rule.source else ""
            raise NoMatchingTagError(
                f"rule {rule.text!r}{where}: no tag matches {rule.pattern!r} in {run.label}; "
                f"nearest tags: {', '.join(near) if near else '(none)'}"
            )
        for tag in matched:
            series = run.scalars[tag]
            key = (tag, rule.reducer, rule.window)
            value = reduced.get(key)
            if value is None:
                value = reduced[key] = rule.reduce(series.values)
            results.append(CheckResult(
                run.label, rule, tag, value, "pass" if rule.compare(value) else "fail",
                n_values=len(series),
                last_step=int(series.steps[-1]) if len(series) else None,
            ))
    return results


# --------------------------------------------------------------------------- report


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.6g}"


def _gh_escape(text: str, prop: bool = False) -> str:
    """Data (or, with ``prop``, a property value) of a GitHub workflow command: control
    characters shown escaped, then ``%``, CR and LF (and ``:``, ``,`` in properties) encoded
    as the runner expects."""
    text = printable(text).replace("##[", "##\\x5b")
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


@dataclass
class GateReport:
    """All check results; ``passed`` is True when no check failed. ``warnings`` lists what the
    readers skipped or ignored (special files, an incomplete last record)."""

    results: list[CheckResult]
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        n = len(self.results)
        f = len(self.failures)
        s = sum(r.status == "skip" for r in self.results)
        verdict = "PASSED" if self.passed else "FAILED"
        return f"{verdict}: {n} checks, {n - f - s} passed, {f} failed, {s} skipped"

    def to_text(self) -> str:
        """A table: (run,) tag, reducer, value, op, threshold, verdict; then a summary line.

        Control characters in tags and run names are shown escaped (``\\n``, ``\\x1b``), and no
        line can be taken for a CI workflow command."""
        runs = {r.run for r in self.results}
        head = (["run"] if len(runs) > 1 else []) + ["tag", "reducer", "value", "op",
                                                      "threshold", "verdict"]
        rows = []
        for r in self.results:
            row = [printable(r.run)] if len(runs) > 1 else []
            row += [printable(r.tag), r.rule.reducer_label,
                    _fmt(r.value) if r.status != "skip" else "-",
                    r.rule.op, _fmt(r.rule.threshold), r.status.upper()]
            rows.append(row)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
        lines = [_no_commands("  ".join(str(x).ljust(w)
                                        for x, w in zip(row, widths, strict=True)).rstrip())
                 for row in [head, ["-" * w for w in widths], *rows]]
        return "\n".join(lines + ["", self.summary()])

    def to_json(self, indent: int | None = 2) -> str:
        """``{"passed", "summary", "checks": [...], "warnings": [...]}`` (NaN as null,
        infinities as strings; ``[`` after ``##`` is written ``\\u005b``, the same string)."""
        text = json.dumps({"passed": self.passed, "summary": self.summary(),
                           "checks": [r.as_dict() for r in self.results],
                           "warnings": list(self.warnings)}, indent=indent)
        return text.replace("##[", "##\\u005b")

    def to_github(self) -> str:
        """GitHub Actions workflow commands: one ``::error`` per failed check, then a notice."""
        lines = []
        for r in self.failures:
            props = [f"title={_gh_escape('spectral gate: ' + r.rule.label, prop=True)}"]
            if r.rule.source and ":" in r.rule.source:
                file, _, line = r.rule.source.rpartition(":")
                if line.isdigit():
                    props = [f"file={_gh_escape(file, True)}", f"line={line}", *props]
            msg = (f"{r.tag}: {r.rule.reducer_label} = {_fmt(r.value)}, expected "
                   f"{r.rule.op} {_fmt(r.rule.threshold)} (run {r.run})")
            lines.append(f"::error {','.join(props)}::{_gh_escape(msg)}")
        level = "notice" if self.passed else "error"
        lines.append(f"::{level} title=spectral gate::{_gh_escape(self.summary())}")
        return "\n".join(lines)

    def to_junit(self) -> str:
        """JUnit XML: one ``<testcase>`` per check (failed -> ``<failure>``, optional ->
        ``<skipped>``), grouped in one ``<testsuite>`` per run. Control characters (which XML
        1.0 cannot hold) are written escaped, as ``\\x1b``."""
        p = printable
        root = ET.Element("testsuites", name="lightning-spectral check",
                          tests=str(len(self.results)), failures=str(len(self.failures)))
        by_run: dict[str, list[CheckResult]] = {}
        for r in self.results:
            by_run.setdefault(r.run, []).append(r)
        for run, results in by_run.items():
            suite = ET.SubElement(
                root, "testsuite", name=p(run), tests=str(len(results)),
                failures=str(sum(r.status == "fail" for r in results)),
                skipped=str(sum(r.status == "skip" for r in results)), errors="0")
            for r in results:
                case = ET.SubElement(suite, "testcase", classname=p(run),
                                     name=p(f"{r.tag} {r.rule.reducer_label} {r.rule.op} "
                                            f"{_fmt(r.rule.threshold)}"))
                if r.status == "fail":
                    failure = ET.SubElement(
                        case, "failure", type="SpectralGateFailure",
                        message=p(f"{r.rule.reducer_label}({r.tag}) = {_fmt(r.value)}, "
                                  f"expected {r.rule.op} {_fmt(r.rule.threshold)}"))
                    failure.text = (f"rule: {p(r.rule.text)}\nsource: {p(r.rule.source or '-')}"
                                    f"\nvalues: {r.n_values}, last step: {r.last_step}")
                elif r.status == "skip":
                    ET.SubElement(case, "skipped", message=p(f"optional rule {r.rule.text!r} "
                                                             "matched no tag"))
        ET.indent(root)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def check(
    run: str | Path | Run | Mapping[str, Any] | Sequence[str | Path | Run],
    rules: str | Rule | Iterable[str | Rule],
) -> GateReport:
    """Evaluate ``rules`` on one or several runs and return a :class:`GateReport`.

    ``run`` is a path (see :func:`read_run`), a :class:`Run`, a ``{tag: values}`` mapping, or a
    list of those. ``rules`` are rule strings or :class:`Rule` objects. Bad input raises a
    :class:`GateInputError`; a failed check does not raise — test ``report.passed``::

        report = check("runs/mlp/version_0", ["vne/* >= 1.0", "collapse/nc1 < 0.5"])
        assert report.passed, report.to_text()
    """
    parsed = _as_rules(rules)
    if not parsed:
        raise GateInputError("no rules given")
    if isinstance(run, (str, Path, Run, Mapping)):
        runs: list[Any] = [run]
    else:
        runs = list(run)
    results: list[CheckResult] = []
    warnings: list[str] = []
    for item in runs:
        if isinstance(item, Run):
            loaded = item
        elif isinstance(item, Mapping):
            loaded = Run.from_mapping(item)
        else:
            loaded = read_run(item)
        warnings.extend(loaded.warnings)
        results.extend(evaluate(loaded, parsed))
    return GateReport(results, warnings)
