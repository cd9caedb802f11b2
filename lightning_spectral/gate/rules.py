"""The rule language and TOML rules files: :func:`parse_rule`, :class:`Rule`, :func:`load_rules`.

A rule is ``TAG_PATTERN [REDUCER] OP THRESHOLD`` (grammar in :mod:`lightning_spectral.gate`).
Rules files are TOML ``[[rule]]`` tables; a small scan of the (valid) TOML text gives each rule
the exact line of its ``check`` key, so errors and reports point at ``FILE:LINE``. Parsing
never backtracks exponentially, whatever the input.
"""

from __future__ import annotations

import fnmatch
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_spectral._eventfile import open_regular
from lightning_spectral.gate._common import (
    OPS,
    GateInputError,
    RuleSyntaxError,
    _fmt,
)
from lightning_spectral.reduce import WINDOWED, reduce_values

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


def _match_end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """The end of ``pattern``'s match at ``pos``, for a pattern that matches there (``_WS``
    and ``_TOML_SKIP`` match the empty string; ``_BASELINE`` is matched first)."""
    m = pattern.match(text, pos)
    assert m is not None
    return m.end()
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
    pos = _match_end(_WS, rule, 0)

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
    pos = _match_end(_WS, rule, m.end())
    reducer, window = "last", None
    m = _REDUCER.match(rule, pos)
    if m:
        reducer = m.group(1)
        pos = m.end()
        w = _WINDOW.match(rule, pos)
        if w:
            if reducer not in WINDOWED:
                raise fail(_match_end(_WS, rule, pos),
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
                raise fail(_match_end(_WS, rule, k.end()),
                           f"expected ')' closing {reducer}(last=K)")
            pos = c.end()
        elif _PAREN.match(rule, pos):
            raise fail(_match_end(_WS, rule, pos), f"expected '{reducer}(last=K)'"
                       if reducer in WINDOWED else f"{reducer!r} takes no window")
        elif reducer == "slope":
            raise fail(pos, "expected '(last=K)': slope needs a window, slope(last=K)")
        pos = _match_end(_WS, rule, pos)
    m = _OP.match(rule, pos)
    if not m:
        if pos < len(rule) and rule[pos].isalpha():
            raise fail(pos, f"expected a reducer ({_REDUCER_HELP}) "
                            "or an operator (< <= > >= == !=)")
        raise fail(pos, "expected an operator (< <= > >= == !=)")
    op = m.group(0)
    pos = _match_end(_WS, rule, m.end())
    threshold, factor, offset = 0.0, None, 0.0
    if _BASELINE.match(rule, pos):
        factor, pos = 1.0, _match_end(_BASELINE, rule, pos)
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
    rest = _match_end(_WS, rule, pos)
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
        at = _match_end(_TOML_SKIP, text, pos)
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
        pos = _match_end(_TOML_SKIP, text, pos)
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
