"""Evaluating rules on runs: :func:`evaluate` (one loaded run), :func:`check` (runs given as
paths, :class:`~lightning_spectral.gate.runs.Run` objects or mappings, optionally against a
baseline run) and :func:`require_baseline`.

Each rule expands to one :class:`CheckResult` per matching tag; the tags are indexed once, so
matching costs time linear in the number of rules and tags. A NaN value fails every operator;
a baseline rule on a tag the baseline lacks fails (or, optional, skips) with a note.
"""

from __future__ import annotations

import bisect
import difflib
import fnmatch
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from lightning_spectral.gate._common import (
    GateInputError,
    MissingBaselineError,
    NoMatchingTagError,
    RunReadError,
    _fmt,
)
from lightning_spectral.gate.formats import GateReport
from lightning_spectral.gate.rules import Rule, _as_rules
from lightning_spectral.gate.runs import Run, read_run

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
            "threshold": _json_number(cast(float, self.threshold)),  # set by __post_init__
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


def _baseline_run(baseline: str | os.PathLike[str] | Run | Mapping[str, Any]) -> Run:
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
            note: str | None
            if rule.relative and b is None:
                status, note = missing, NOT_IN_BASELINE
            else:
                status = "pass" if rule.compare(value, threshold) else "fail"
                note = ("the baseline value is NaN"
                        if rule.relative and math.isnan(cast(float, b)) else None)
            results.append(CheckResult(
                run.label, rule, tag, value, status,
                n_values=len(series),
                last_step=int(series.steps[-1]) if len(series) else None,
                baseline=b, threshold=threshold, note=note,
            ))
    return results


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
