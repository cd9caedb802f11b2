"""Threshold rules over logged runs: the engine of ``lightning-spectral check`` and SpectralAlarm.

A rule is ``TAG_PATTERN [REDUCER] OP THRESHOLD``::

    vne/encoder.* >= 2.0
    collapse/nc1 last < 0.5
    erank/* min > 4
    weight_stable_rank/fc2 mean(last=5) <= 30
    vne/* drop_from_max_rel <= 0.3
    erank/* last >= 0.8 * baseline
    vne/classifier mean(last=5) >= baseline - 0.1

* ``TAG_PATTERN`` is a shell-style glob (``*``, ``?``, ``[...]``; ``*`` also crosses ``/``);
  it expands to one check per matching scalar tag.
* ``REDUCER`` turns a tag's series (ordered by step) into one number: ``last`` (the default),
  ``first``, ``min``, ``max``, ``mean``, ``mean(last=K)`` (mean of the last ``K`` values),
  ``slope(last=K)`` (least-squares slope per step of the last ``K`` values),
  ``drop_from_max`` (``max - last``) or ``drop_from_max_rel`` (``(max - last) / |max|``);
  see :mod:`lightning_spectral.reduce`.
* ``OP`` is one of ``< <= > >= == !=``.
* ``THRESHOLD := NUMBER | [NUMBER '*'] 'baseline' [('+' | '-') NUMBER]``: a number (``inf``
  and ``-inf`` allowed), or an affine function of the same reducer applied to the same tag in
  a **baseline run** (``check(..., baseline=...)``, ``--baseline``). A tag the baseline lacks
  fails the check (skips it for an optional rule), with a note; it is never silently passed.

A NaN reduced value (or a NaN baseline value) fails every operator (a gate treats a NaN metric
as a failure); NaN propagates through ``min``, ``max``, ``mean`` and the trend reducers. Runs
are read by :func:`read_run` with every logged value counted (no sampling). This module only
compares what was logged (docs/gate.md). Only the standard library and NumPy are imported here,
so the command line starts fast.

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
from lightning_spectral.reduce import REDUCERS, WINDOWED, reduce_values

__all__ = [
    "Rule",
    "Run",
    "CheckResult",
    "GateReport",
    "GateInputError",
    "RuleSyntaxError",
    "RunReadError",
    "NoMatchingTagError",
    "MissingBaselineError",
    "parse_rule",
    "load_rules",
    "read_run",
    "evaluate",
    "check",
    "require_baseline",
    "REDUCERS",
    "OPS",
    "printable",
]

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


class MissingBaselineError(GateInputError):
    """A rule compares with a baseline (``... >= 0.8 * baseline``) but none was given."""


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
    """One parsed rule: ``pattern reducer op threshold`` (see the module docstring).

    A baseline rule (``factor`` is not None) compares with ``factor * baseline + offset``,
    ``baseline`` being the same reducer applied to the same tag in a baseline run; its
    ``threshold`` is NaN (it depends on the baseline)."""

    text: str
    pattern: str
    reducer: str = "last"
    window: int | None = None
    op: str = "<"
    threshold: float = 0.0
    optional: bool = False
    name: str | None = None
    source: str | None = None  # "file.toml:LINE" when read from a rules file
    factor: float | None = None  # baseline rules: threshold = factor * baseline + offset
    offset: float = 0.0

    @property
    def reducer_label(self) -> str:
        return f"{self.reducer}(last={self.window})" if self.window is not None else self.reducer

    @property
    def label(self) -> str:
        return self.name or self.text

    @property
    def relative(self) -> bool:
        """Whether the threshold depends on a baseline run."""
        return self.factor is not None

    @property
    def threshold_label(self) -> str:
        """The threshold as written: ``2``, ``baseline``, ``0.8 * baseline - 0.1``."""
        if self.factor is None:
            return _fmt(self.threshold)
        text = "baseline" if self.factor == 1.0 else f"{_fmt(self.factor)} * baseline"
        if self.offset:
            text += f" {'-' if self.offset < 0 else '+'} {_fmt(abs(self.offset))}"
        return text

    def threshold_for(self, baseline: float | None) -> float:
        """The number to compare with: ``threshold``, or ``factor * baseline + offset`` for a
        baseline rule (NaN when the baseline value is missing or NaN)."""
        if self.factor is None:
            return self.threshold
        if baseline is None or math.isnan(baseline):
            return math.nan
        if self.factor == 1.0:  # exact: `== baseline` holds on identical runs
            return baseline + self.offset
        return self.factor * baseline + self.offset

    def reduce(self, values: np.ndarray, steps: np.ndarray | None = None) -> float:
        """Apply the reducer to a series (ordered by step, one value per step; ``steps`` for
        ``slope``, positions if omitted); NaN for an empty series
        (:func:`lightning_spectral.reduce.reduce_values`)."""
        return reduce_values(values, self.reducer, self.window, steps)

    def compare(self, value: float, threshold: float | None = None) -> bool:
        """``value OP threshold`` (the rule's own threshold unless one is given); False
        whenever ``value`` or the threshold is NaN."""
        limit = self.threshold if threshold is None else threshold
        if math.isnan(value) or math.isnan(limit):
            return False
        return bool(OPS[self.op](value, limit))

    def matches(self, tag: str) -> bool:
        return fnmatch.fnmatchcase(tag, self.pattern)


_WS = re.compile(r"\s*")
_PATTERN = re.compile(r"[^\s<>=!]+")
_REDUCER = re.compile(r"(last|first|min|max|mean|slope|drop_from_max_rel|drop_from_max)\b(?!/)")
_WINDOW = re.compile(r"\s*\(\s*last\s*=\s*")
_PAREN = re.compile(r"\s*\(")
_INT = re.compile(r"[0-9]+")
_CLOSE = re.compile(r"\s*\)")
_OP = re.compile(r"<=|>=|==|!=|<|>")
_NUMBER = re.compile(r"[+-]?(?:inf(?:inity)?|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)",
                     re.IGNORECASE)
_BASELINE = re.compile(r"baseline\b")
_TIMES = re.compile(r"\s*\*\s*")
_SIGN = re.compile(r"\s*([+-])\s*")
_REDUCER_HELP = "last, first, min, max, mean, mean(last=K), slope(last=K), drop_from_max, " \
                "drop_from_max_rel"


def parse_rule(text: str, *, optional: bool = False, name: str | None = None,
               source: str | None = None) -> Rule:
    """Parse ``TAG_PATTERN [REDUCER] OP THRESHOLD`` into a :class:`Rule`, where
    ``THRESHOLD := NUMBER | [NUMBER '*'] 'baseline' [('+' | '-') NUMBER]``.

    Raises :class:`RuleSyntaxError` (with the 1-based column of the problem) when malformed.
    """
    if not isinstance(text, str):
        raise RuleSyntaxError(str(text), 1, "a rule must be a string", source)
    rule = text
    pos = _WS.match(rule, 0).end()

    def fail(at: int, expected: str) -> RuleSyntaxError:
        return RuleSyntaxError(rule, at + 1, expected, source)

    def number(at: int, follow: str, finite: bool) -> tuple[float, int]:
        """The number at ``at`` (followed by whitespace, the end or a character of
        ``follow``) and the offset after it."""
        m = _NUMBER.match(rule, at)
        if not m or (m.end() < len(rule) and not rule[m.end()].isspace()
                     and rule[m.end()] not in follow):
            raise fail(at, "expected a number")
        value = float(m.group(0))
        if finite and not math.isfinite(value):
            raise fail(at, "expected a finite number")
        return value, m.end()

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
            if reducer not in WINDOWED:
                raise fail(_WS.match(rule, pos).end(),
                           f"only 'mean' and 'slope' take a window, not {reducer!r}")
            pos = w.end()
            k = _INT.match(rule, pos)
            least = 2 if reducer == "slope" else 1
            if not k or len(k.group(0).lstrip("0")) > 18 or int(k.group(0)) < least:
                what = "a positive integer K" if least == 1 else "an integer K >= 2"
                raise fail(pos, f"expected {what} (at most 18 digits) in {reducer}(last=K)")
            window = int(k.group(0))
            c = _CLOSE.match(rule, k.end())
            if not c:
                raise fail(_WS.match(rule, k.end()).end(),
                           f"expected ')' closing {reducer}(last=K)")
            pos = c.end()
        elif _PAREN.match(rule, pos):
            raise fail(_WS.match(rule, pos).end(), f"expected '{reducer}(last=K)'"
                       if reducer in WINDOWED else f"{reducer!r} takes no window")
        elif reducer == "slope":
            raise fail(pos, "expected '(last=K)': slope needs a window, slope(last=K)")
        pos = _WS.match(rule, pos).end()
    m = _OP.match(rule, pos)
    if not m:
        if pos < len(rule) and rule[pos].isalpha():
            raise fail(pos, f"expected a reducer ({_REDUCER_HELP}) "
                            "or an operator (< <= > >= == !=)")
        raise fail(pos, "expected an operator (< <= > >= == !=)")
    op = m.group(0)
    pos = _WS.match(rule, m.end()).end()
    threshold, factor, offset = 0.0, None, 0.0
    if _BASELINE.match(rule, pos):
        factor, pos = 1.0, _BASELINE.match(rule, pos).end()
    else:
        if not _NUMBER.match(rule, pos):
            raise fail(pos, "expected a number or 'baseline' (e.g. 2.0, 0.8 * baseline, "
                            "baseline - 0.1)")
        value, end = number(pos, "*", finite=False)
        times = _TIMES.match(rule, end)
        if times and times.end() > end and rule[end:times.end()].strip() == "*":
            b = _BASELINE.match(rule, times.end())
            if not b:
                raise fail(times.end(), "expected 'baseline' after '*'")
            if not math.isfinite(value):
                raise fail(pos, "expected a finite number")
            factor, pos = value, b.end()
        else:
            threshold, pos = value, end
    if factor is not None:
        threshold = math.nan
        sign = _SIGN.match(rule, pos)
        if sign:
            offset, pos = number(sign.end(), "", finite=True)
            if sign.group(1) == "-":
                offset = -offset
            if rule[sign.end()] in "+-":
                raise fail(sign.end(), "expected a number without a sign after "
                                       f"'{sign.group(1)}'")
        elif pos < len(rule) and not rule[pos].isspace():
            raise fail(pos, "expected '+ NUMBER', '- NUMBER' or the end of the rule")
    rest = _WS.match(rule, pos).end()
    if rest != len(rule):
        if factor is not None:
            raise fail(rest, "expected '+ NUMBER', '- NUMBER' or the end of the rule"
                       if not offset else "expected the end of the rule")
        raise fail(rest, "expected the end of the rule")
    return Rule(text=rule.strip(), pattern=pattern, reducer=reducer, window=window, op=op,
                threshold=threshold, optional=bool(optional), name=name, source=source,
                factor=factor, offset=offset)


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
        raise GateInputError(f"{where}[[rule]] needs check = "
                             "\"TAG_PATTERN [REDUCER] OP THRESHOLD\"")
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

    Each table has ``check = "TAG_PATTERN [REDUCER] OP THRESHOLD"`` and optionally
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

#: the note of a baseline check whose tag the baseline run lacks (and the reverse)
NOT_IN_BASELINE = "not in the baseline run"
NOT_IN_RUN = "not in this run (only in the baseline run)"


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one rule on one tag of one run (``status`` pass / fail / skip).

    ``threshold`` is the number the value was compared with (for a baseline rule,
    ``factor * baseline + offset``; NaN when the baseline lacks the tag); ``baseline`` is the
    same reducer on the same tag of the baseline run (``None`` without a baseline, or when the
    baseline lacks the tag); ``note`` says why a check could not compare (a tag missing from
    the baseline or from the run)."""

    run: str
    rule: Rule
    tag: str
    value: float
    status: str
    n_values: int = 0
    last_step: int | None = None
    baseline: float | None = None
    threshold: float | None = None  # None: the rule's own threshold
    note: str | None = None

    def __post_init__(self) -> None:
        if self.threshold is None:
            object.__setattr__(self, "threshold", self.rule.threshold)

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    @property
    def has_value(self) -> bool:
        """Whether the run had the tag (not an optional rule's 'no tag matched', not a tag
        that only the baseline has)."""
        return self.note != NOT_IN_RUN and not (self.status == "skip" and self.note is None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "rule": self.rule.text,
            "name": self.rule.name,
            "source": self.rule.source,
            "tag": self.tag,
            "reducer": self.rule.reducer_label,
            "value": _json_number(self.value),
            "op": self.rule.op,
            "threshold": _json_number(self.threshold),
            "baseline": None if self.baseline is None else _json_number(self.baseline),
            "status": self.status,
            "passed": self.passed,
            "n_values": self.n_values,
            "last_step": self.last_step,
            "note": self.note,
        }

    def expected(self) -> str:
        """``>= 2.3`` or, for a baseline rule, ``>= 2.3 (0.8 * baseline, baseline 2.875)``."""
        text = f"{self.rule.op} {_fmt(self.threshold)}"  # type: ignore[arg-type]
        if self.rule.relative:
            base = "missing" if self.baseline is None else _fmt(self.baseline)
            text += f" ({self.rule.threshold_label}, baseline {base})"
        return text


def _json_number(x: float) -> float | str | None:
    return x if math.isfinite(x) else _nonfinite(x)


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


class _Reduced:
    """A run with its tag index and its reductions, each computed once per (tag, reducer)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.index = _TagIndex(run.tags)
        self.cache: dict[tuple[str, str, int | None], float] = {}

    def value(self, tag: str, rule: Rule) -> float | None:
        """The rule's reducer on ``tag`` (None when the run lacks the tag)."""
        series = self.run.scalars.get(tag)
        if series is None:
            return None
        key = (tag, rule.reducer, rule.window)
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = rule.reduce(series.values, series.steps)
        return value


def _baseline_run(baseline: str | Path | Run | Mapping[str, Any]) -> Run:
    """Read a baseline run; a reading error names it as the baseline."""
    if isinstance(baseline, Run):
        return baseline
    if isinstance(baseline, Mapping):
        return Run.from_mapping(baseline, label="baseline")
    try:
        return read_run(baseline)
    except RunReadError as exc:
        raise RunReadError(f"baseline {exc}") from exc


def require_baseline(rules: Sequence[Rule], what: str = "a baseline run") -> None:
    """Raise :class:`MissingBaselineError` naming the first rule that compares with a baseline
    (``... * baseline``) when no baseline was given; ``what`` says how to give one."""
    for rule in rules:
        if rule.relative:
            where = f" ({rule.source})" if rule.source else ""
            raise MissingBaselineError(
                f"rule {rule.text!r}{where} compares with a baseline, but no baseline was "
                f"given ({what})")


def evaluate(run: Run, rules: Sequence[Rule],
             baseline: str | Path | Run | Mapping[str, Any] | None = None
             ) -> list[CheckResult]:
    """Check every rule against ``run`` (one result per matching tag, in tag order).

    With a ``baseline`` run, a baseline rule compares each tag with ``factor * b + offset``,
    ``b`` being the same reducer on the same tag of the baseline; a tag only one of the two
    runs has fails (skips, for an optional rule) with a note. Every result also carries the
    baseline's value of its tag, when it has one.

    Raises :class:`NoMatchingTagError` for a non-optional rule that matches no tag (in the run,
    nor in the baseline for a baseline rule); an optional one gives a single ``skip`` result.
    Raises :class:`MissingBaselineError` for a baseline rule without a baseline. Time is
    linear in the number of rules plus the number of checks (a pattern is matched once; a
    reduction is computed once per tag).
    """
    base = _as_reduced(baseline)
    if base is None:
        require_baseline(rules, "pass baseline=...")
    here = _Reduced(run)
    return _evaluate(here, rules, base)


def _as_reduced(baseline: Any) -> _Reduced | None:
    if baseline is None or isinstance(baseline, _Reduced):
        return baseline
    return _Reduced(baseline if isinstance(baseline, Run) else _baseline_run(baseline))


def _evaluate(here: _Reduced, rules: Sequence[Rule], base: _Reduced | None
              ) -> list[CheckResult]:
    run, index = here.run, here.index
    results: list[CheckResult] = []
    nan = math.nan
    for rule in rules:
        matched = index.matching(rule.pattern)
        only_base: list[str] = []
        if rule.relative and base is not None:
            only_base = [t for t in base.index.matching(rule.pattern) if t not in index.known]
        if not matched and not only_base:
            if rule.optional:
                results.append(CheckResult(run.label, rule, rule.pattern, nan, "skip",
                                           threshold=nan if rule.relative else None))
                continue
            near = _nearest(rule.pattern, index.tags)
            where = f" ({rule.source})" if rule.source else ""
            also = f" nor in the baseline {base.run.label}" if rule.relative and base else ""
            raise NoMatchingTagError(
                f"rule {rule.text!r}{where}: no tag matches {rule.pattern!r} in {run.label}"
                f"{also}; nearest tags: {', '.join(near) if near else '(none)'}"
            )
        missing = "skip" if rule.optional else "fail"
        tags = sorted(matched + only_base) if only_base else matched
        for tag in tags:
            b = base.value(tag, rule) if base is not None else None
            series = run.scalars.get(tag)
            if series is None:  # a baseline rule's tag that only the baseline has
                results.append(CheckResult(run.label, rule, tag, nan, missing, baseline=b,
                                           threshold=rule.threshold_for(b), note=NOT_IN_RUN))
                continue
            value = here.value(tag, rule)
            assert value is not None
            threshold = rule.threshold_for(b)
            if rule.relative and b is None:
                status, note = missing, NOT_IN_BASELINE
            else:
                status = "pass" if rule.compare(value, threshold) else "fail"
                note = "the baseline value is NaN" if rule.relative and math.isnan(b) else None
            results.append(CheckResult(
                run.label, rule, tag, value, status,
                n_values=len(series),
                last_step=int(series.steps[-1]) if len(series) else None,
                baseline=b, threshold=threshold, note=note,
            ))
    return results


# --------------------------------------------------------------------------- report


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.6g}"


def _change(value: float, baseline: float | None) -> str:
    """The relative change from ``baseline`` to ``value`` (``+12.5%``), or '' when undefined."""
    if baseline is None or not (math.isfinite(value) and math.isfinite(baseline)) \
            or baseline == 0:
        return ""
    change = 100.0 * (value - baseline) / abs(baseline)
    if abs(change) < 0.05:
        return "0.0%"
    return f"{change:+.1f}%" if abs(change) < 1e6 else f"{change:+.3g}%"


def _gh_escape(text: str, prop: bool = False) -> str:
    """Data (or, with ``prop``, a property value) of a GitHub workflow command: control
    characters shown escaped, then ``%``, CR and LF (and ``:``, ``,`` in properties) encoded
    as the runner expects."""
    text = printable(text).replace("##[", "##\\x5b")
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


_BACKTICKS = re.compile("`+")


def _md_code(text: object) -> str:
    """``text`` as a Markdown code span that stays one table cell: control characters shown
    escaped, ``|`` written ``\\|`` (GitHub's tables unescape it inside code), a fence longer
    than any run of backticks in the text. Nothing in a code span is markup (no links,
    mentions, emphasis or HTML)."""
    body = printable(text).replace("|", "\\|")
    if not body:
        return "` `"
    fence = "`" * (max((len(m) for m in _BACKTICKS.findall(body)), default=0) + 1)
    pad = " " if body[0] in "` " or body[-1] in "` " else ""
    return f"{fence}{pad}{body}{pad}{fence}"


_STATUS_MD = {"fail": "❌ fail", "skip": "⚪ skip", "pass": "✅ pass"}


@dataclass
class GateReport:
    """All check results; ``passed`` is True when no check failed. ``warnings`` lists what the
    readers skipped or ignored (special files, an incomplete last record); ``baseline`` is the
    label of the baseline run the rules compared with, if any."""

    results: list[CheckResult]
    warnings: list[str] = field(default_factory=list)
    baseline: str | None = None

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

    def _show_baseline(self) -> bool:
        return self.baseline is not None or any(r.rule.relative for r in self.results)

    def to_text(self) -> str:
        """A table: (run,) tag, reducer, (baseline,) value, op, threshold, verdict (, note);
        then a summary line. The baseline column appears when a baseline was given; the
        threshold of a baseline rule is the number it works out to.

        Control characters in tags and run names are shown escaped (``\\n``, ``\\x1b``), and no
        line can be taken for a CI workflow command."""
        runs = {r.run for r in self.results}
        several = len(runs) > 1
        show_base = self._show_baseline()
        notes = any(r.note for r in self.results)
        head = (["run"] if several else []) + ["tag", "reducer"] \
            + (["baseline"] if show_base else []) + ["value", "op", "threshold", "verdict"] \
            + (["note"] if notes else [])
        rows = []
        for r in self.results:
            row = [printable(r.run)] if several else []
            row += [printable(r.tag), r.rule.reducer_label]
            if show_base:
                row.append("-" if r.baseline is None else _fmt(r.baseline))
            row += [_fmt(r.value) if r.has_value else "-", r.rule.op,
                    "-" if r.rule.relative and r.baseline is None
                    else _fmt(r.threshold), r.status.upper()]  # type: ignore[arg-type]
            if notes:
                row.append(r.note or "")
            rows.append(row)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
        lines = [_no_commands("  ".join(str(x).ljust(w)
                                        for x, w in zip(row, widths, strict=True)).rstrip())
                 for row in [head, ["-" * w for w in widths], *rows]]
        tail = [""]
        if self.baseline is not None:
            tail.append(safe_line(f"baseline: {self.baseline}"))
        return "\n".join(lines + tail + [self.summary()])

    def to_json(self, indent: int | None = 2) -> str:
        """``{"passed", "summary", "baseline", "checks": [...], "warnings": [...]}`` (NaN as
        null, infinities as strings; ``[`` after ``##`` is written ``\\u005b``, the same
        string)."""
        text = json.dumps({"passed": self.passed, "summary": self.summary(),
                           "baseline": self.baseline,
                           "checks": [r.as_dict() for r in self.results],
                           "warnings": list(self.warnings)}, indent=indent)
        return text.replace("##[", "##\\u005b")

    def to_markdown(self) -> str:
        """A compact Markdown table for a pull-request comment or ``$GITHUB_STEP_SUMMARY``:
        a heading with the verdict, the summary, then one row per check, failures first (then
        skipped, then passed checks, each in report order), with the baseline and current
        values side by side and the relative change.

        Tags and run names are untrusted: each is a code span with control characters shown
        escaped and ``|`` escaped, so one tag is one cell and nothing in it is markup."""
        several = len({r.run for r in self.results}) > 1
        show_base = self._show_baseline()
        notes = any(r.note for r in self.results)
        icon = "✅" if self.passed else "❌"
        lines = [f"### {icon} Spectral gate {'passed' if self.passed else 'failed'}", ""]
        about = self.summary()
        if self.baseline is not None:
            about += f" · baseline {_md_code(self.baseline)}"
        if not several and self.results:
            about += f" · run {_md_code(self.results[0].run)}"
        lines += [about, ""]
        head = ["", *(["run"] if several else []), "tag", "reducer",
                *(["baseline"] if show_base else []), "value",
                *(["change"] if show_base else []), "check", *(["note"] if notes else [])]
        align = ["---" if h in ("", "run", "tag", "reducer", "check", "note") else "---:"
                 for h in head]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
        order = {"fail": 0, "skip": 1, "pass": 2}
        for r in sorted(self.results, key=lambda r: order.get(r.status, 3)):
            shown = r.has_value
            check = _md_code(f"{r.rule.op} {r.rule.threshold_label}")
            if r.rule.relative and not math.isnan(r.threshold):  # type: ignore[arg-type]
                check += f" = {_fmt(r.threshold)}"  # type: ignore[arg-type]
            row = [_STATUS_MD.get(r.status, r.status), *([_md_code(r.run)] if several else []),
                   _md_code(r.tag), _md_code(r.rule.reducer_label)]
            if show_base:
                row.append("–" if r.baseline is None else _fmt(r.baseline))
            row.append(_fmt(r.value) if shown else "–")
            if show_base:
                row.append(_change(r.value, r.baseline) if shown else "")
            row.append(check)
            if notes:
                row.append(r.note or "")
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(_no_commands(line) for line in lines)

    def to_github(self) -> str:
        """GitHub Actions workflow commands: one ``::error`` per failed check, then a notice."""
        lines = []
        for r in self.failures:
            props = [f"title={_gh_escape('spectral gate: ' + r.rule.label, prop=True)}"]
            if r.rule.source and ":" in r.rule.source:
                file, _, line = r.rule.source.rpartition(":")
                if line.isdigit():
                    props = [f"file={_gh_escape(file, True)}", f"line={line}", *props]
            if r.note:
                msg = f"{r.tag}: {r.note} (rule {r.rule.text}; run {r.run})"
            else:
                msg = (f"{r.tag}: {r.rule.reducer_label} = {_fmt(r.value)}, expected "
                       f"{r.expected()} (run {r.run})")
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
                                            f"{r.rule.threshold_label}"))
                if r.status == "fail":
                    message = (f"{r.tag}: {r.note}" if r.note else
                               f"{r.rule.reducer_label}({r.tag}) = {_fmt(r.value)}, "
                               f"expected {r.expected()}")
                    failure = ET.SubElement(case, "failure", type="SpectralGateFailure",
                                            message=p(message))
                    failure.text = (f"rule: {p(r.rule.text)}\nsource: {p(r.rule.source or '-')}"
                                    f"\nvalues: {r.n_values}, last step: {r.last_step}")
                elif r.status == "skip":
                    why = r.note or "matched no tag"
                    ET.SubElement(case, "skipped", message=p(f"optional rule {r.rule.text!r}: "
                                                             f"{why}"))
        ET.indent(root)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def check(
    run: str | Path | Run | Mapping[str, Any] | Sequence[str | Path | Run],
    rules: str | Rule | Iterable[str | Rule],
    baseline: str | Path | Run | Mapping[str, Any] | None = None,
) -> GateReport:
    """Evaluate ``rules`` on one or several runs and return a :class:`GateReport`.

    ``run`` is a path (see :func:`read_run`), a :class:`Run`, a ``{tag: values}`` mapping, or a
    list of those. ``rules`` are rule strings or :class:`Rule` objects. ``baseline`` (a path,
    a :class:`Run` or a mapping) is the run that baseline rules (``erank/* last >= 0.8 *
    baseline``) compare with; every run is compared with it. Bad input raises a
    :class:`GateInputError` (a baseline rule without ``baseline`` a
    :class:`MissingBaselineError`); a failed check does not raise — test ``report.passed``::

        report = check("runs/mlp/version_0", ["vne/* >= 1.0", "collapse/nc1 < 0.5"])
        assert report.passed, report.to_text()
        report = check("runs/pr", ["erank/* last >= 0.8 * baseline"], baseline="runs/main")
    """
    parsed = _as_rules(rules)
    if not parsed:
        raise GateInputError("no rules given")
    base = None
    if baseline is None:
        require_baseline(parsed, "pass baseline=...")
    else:
        base = _as_reduced(baseline)
    if isinstance(run, (str, Path, Run, Mapping)):
        runs: list[Any] = [run]
    else:
        runs = list(run)
    results: list[CheckResult] = []
    warnings: list[str] = []
    if base is not None:
        warnings.extend(f"baseline {w}" for w in base.run.warnings)
    for item in runs:
        if isinstance(item, Run):
            loaded = item
        elif isinstance(item, Mapping):
            loaded = Run.from_mapping(item)
        else:
            loaded = read_run(item)
        warnings.extend(loaded.warnings)
        results.extend(_evaluate(_Reduced(loaded), parsed, base))
    return GateReport(results, warnings, baseline=base.run.label if base is not None else None)
