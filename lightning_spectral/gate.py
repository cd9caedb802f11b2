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
logged value counted (no sampling). The quantities themselves are defined in SPEC.md; this
module only compares what was logged. Only the standard library and NumPy are imported here,
so the command line starts fast.
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_spectral.errors import SpectralConfigError, SpectralError

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
        """Apply the reducer to a series (ordered by step); NaN for an empty series."""
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0:
            return float("nan")
        if self.window is not None:
            return float(np.mean(v[-self.window :]))
        if self.reducer == "last":
            return float(v[-1])
        if self.reducer == "first":
            return float(v[0])
        if self.reducer == "min":
            return float(np.min(v))
        if self.reducer == "max":
            return float(np.max(v))
        return float(np.mean(v))

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
            if not k or int(k.group(0)) < 1:
                raise fail(pos, "expected a positive integer K in mean(last=K)")
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


def load_rules(path: str | Path) -> list[Rule]:
    """Read a TOML rules file: one ``[[rule]]`` table per rule.

    Each table has ``check = "TAG_PATTERN [REDUCER] OP VALUE"`` and optionally
    ``optional = true`` (no error when nothing matches) and ``name = "..."``. Every rule
    remembers ``file:line`` for error messages and GitHub annotations.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GateInputError(f"{path}: cannot read rules file ({exc})") from exc
    try:
        data = _toml_loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise GateInputError(f"{path}: invalid TOML ({exc})") from exc
    tables = data.get("rule")
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise GateInputError(f"{path}: unknown top-level key(s) {', '.join(unknown)} "
                             "(expected [[rule]] tables)")
    if not isinstance(tables, list) or not tables:
        raise GateInputError(f"{path}: no [[rule]] tables (each needs check = \"...\")")
    lines = text.splitlines()
    out = []
    for i, table in enumerate(tables, 1):
        if not isinstance(table, dict):
            raise GateInputError(f"{path}: rule {i} is not a [[rule]] table")
        check_text = table.get("check")
        line = next((n for n, ln in enumerate(lines, 1)
                     if isinstance(check_text, str) and check_text in ln
                     and ln.lstrip().startswith("check")), None)
        source = f"{path}:{line}" if line else f"{path} rule {i}"
        out.append(_rule_from_table(table, source, check_text))
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


def _event_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.name.startswith("events.out.tfevents"))


def _read_event_dir(directory: Path, files: list[Path], label: str) -> Run:
    from lightning_spectral._eventfile import EventFileError, read_scalars

    loaded = []
    for path in files:
        try:
            loaded.append((path, read_scalars(path)))
        except EventFileError as exc:
            raise RunReadError(f"{exc.path}: unreadable event file: {exc.reason}") from exc
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
    return Run(scalars=scalars, label=label, files=[str(p) for p, _ in loaded])


def _read_csv(path: Path, label: str) -> Run:
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise RunReadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    columns: dict[str, tuple[list[int], list[float]]] = {}
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise RunReadError(f"{path}: empty metrics file") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise RunReadError(f"{path}: not a CSV file ({exc})") from exc
        header = [h.strip() for h in header]
        step_col = header.index("step") if "step" in header else None
        try:
            for row_no, row in enumerate(reader):
                line = reader.line_num
                if not row:
                    continue
                if len(row) > len(header):
                    raise RunReadError(f"{path}:{line}: {len(row)} cells but {len(header)} "
                                       "columns in the header")
                step = row_no
                if step_col is not None:
                    cell = row[step_col].strip() if step_col < len(row) else ""
                    if cell:
                        try:
                            step = int(float(cell))
                        except ValueError:
                            raise RunReadError(f"{path}:{line}: step {cell!r} is not a "
                                               "number") from None
                for j, cell in enumerate(row):
                    cell = cell.strip()
                    if j == step_col or not cell:
                        continue
                    try:
                        value = float(cell)
                    except ValueError:
                        raise RunReadError(f"{path}:{line}: column {header[j]!r} value "
                                           f"{cell!r} is not a number") from None
                    col = columns.setdefault(header[j], ([], []))
                    col[0].append(step)
                    col[1].append(value)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise RunReadError(f"{path}: not a readable CSV file ({exc})") from exc
    if not columns:
        raise RunReadError(f"{path}: no logged values (empty run)")
    scalars = {
        tag: _dedupe(np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
        for tag, (s, v) in columns.items()
    }
    return Run(scalars=scalars, label=label, files=[str(path)])


def read_run(path: str | Path, label: str | None = None) -> Run:
    """Read every scalar of a run.

    ``path`` is a Lightning log version directory, any directory holding TensorBoard event
    files, a directory whose event files all sit in one sub-directory, or a CSVLogger
    ``metrics.csv`` (the file or its directory). Several event files are merged by step,
    ordered by the wall time of their first event: a step written twice (as after a resumed
    run) keeps the latest write. Steps an interrupted run wrote beyond the point a resumed run
    reached are kept, as TensorBoard shows them.
    Raises :class:`RunReadError` naming the file for anything missing, empty or corrupt.
    """
    path = Path(path)
    label = label or str(path)
    if not path.exists():
        raise RunReadError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.startswith("events.out.tfevents"):
            return _read_event_dir(path.parent, [path], label)
        return _read_csv(path, label)
    files = _event_files(path)
    if files:
        return _read_event_dir(path, files, label)
    if (path / "metrics.csv").is_file():
        return _read_csv(path / "metrics.csv", label)
    holders = sorted({p.parent for p in path.rglob("events.out.tfevents*") if p.is_file()})
    if len(holders) == 1:
        return _read_event_dir(holders[0], _event_files(holders[0]), label)
    if len(holders) > 1:
        shown = ", ".join(str(h) for h in holders[:5]) + (" ..." if len(holders) > 5 else "")
        raise RunReadError(f"{path}: holds several runs ({shown}); pass one of them")
    csvs = sorted(path.rglob("metrics.csv"))
    if len(csvs) == 1:
        return _read_csv(csvs[0], label)
    if len(csvs) > 1:
        raise RunReadError(f"{path}: holds several metrics.csv files "
                           f"({', '.join(str(c) for c in csvs[:5])}); pass one of them")
    raise RunReadError(f"{path}: no TensorBoard event files or metrics.csv (empty run)")


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


def evaluate(run: Run, rules: Sequence[Rule]) -> list[CheckResult]:
    """Check every rule against ``run`` (one result per matching tag, in tag order).

    Raises :class:`NoMatchingTagError` for a non-optional rule that matches no tag; an
    optional one gives a single ``skip`` result.
    """
    tags = run.tags
    results: list[CheckResult] = []
    for rule in rules:
        matched = [t for t in tags if rule.matches(t)]
        if not matched:
            if rule.optional:
                results.append(CheckResult(run.label, rule, rule.pattern, float("nan"), "skip"))
                continue
            near = _nearest(rule.pattern, tags)
            where = f" ({rule.source})" if rule.source else ""
            raise NoMatchingTagError(
                f"rule {rule.text!r}{where}: no tag matches {rule.pattern!r} in {run.label}; "
                f"nearest tags: {', '.join(near) if near else '(none)'}"
            )
        for tag in matched:
            series = run.scalars[tag]
            value = rule.reduce(series.values)
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
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


@dataclass
class GateReport:
    """All check results; ``passed`` is True when no check failed."""

    results: list[CheckResult]

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
        """A table: (run,) tag, reducer, value, op, threshold, verdict; then a summary line."""
        runs = {r.run for r in self.results}
        head = (["run"] if len(runs) > 1 else []) + ["tag", "reducer", "value", "op",
                                                      "threshold", "verdict"]
        rows = []
        for r in self.results:
            row = [r.run] if len(runs) > 1 else []
            row += [r.tag, r.rule.reducer_label, _fmt(r.value) if r.status != "skip" else "-",
                    r.rule.op, _fmt(r.rule.threshold), r.status.upper()]
            rows.append(row)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
                 for row in [head, ["-" * w for w in widths], *rows]]
        return "\n".join(lines + ["", self.summary()])

    def to_json(self, indent: int | None = 2) -> str:
        """``{"passed", "summary", "checks": [...]}`` (NaN as null, infinities as strings)."""
        return json.dumps({"passed": self.passed, "summary": self.summary(),
                           "checks": [r.as_dict() for r in self.results]}, indent=indent)

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
        ``<skipped>``), grouped in one ``<testsuite>`` per run."""
        root = ET.Element("testsuites", name="lightning-spectral check",
                          tests=str(len(self.results)), failures=str(len(self.failures)))
        by_run: dict[str, list[CheckResult]] = {}
        for r in self.results:
            by_run.setdefault(r.run, []).append(r)
        for run, results in by_run.items():
            suite = ET.SubElement(
                root, "testsuite", name=run, tests=str(len(results)),
                failures=str(sum(r.status == "fail" for r in results)),
                skipped=str(sum(r.status == "skip" for r in results)), errors="0")
            for r in results:
                case = ET.SubElement(suite, "testcase", classname=run,
                                     name=f"{r.tag} {r.rule.reducer_label} {r.rule.op} "
                                          f"{_fmt(r.rule.threshold)}")
                if r.status == "fail":
                    failure = ET.SubElement(
                        case, "failure", type="SpectralGateFailure",
                        message=f"{r.rule.reducer_label}({r.tag}) = {_fmt(r.value)}, "
                                f"expected {r.rule.op} {_fmt(r.rule.threshold)}")
                    failure.text = (f"rule: {r.rule.text}\nsource: {r.rule.source or '-'}\n"
                                    f"values: {r.n_values}, last step: {r.last_step}")
                elif r.status == "skip":
                    ET.SubElement(case, "skipped", message=f"optional rule {r.rule.text!r} "
                                                           "matched no tag")
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
    for item in runs:
        if isinstance(item, Run):
            loaded = item
        elif isinstance(item, Mapping):
            loaded = Run.from_mapping(item)
        else:
            loaded = read_run(item)
        results.extend(evaluate(loaded, parsed))
    return GateReport(results)
