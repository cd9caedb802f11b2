"""The reports of a gate: :class:`GateReport` and its text, JSON, GitHub workflow-command,
JUnit XML and Markdown forms.

Every tag, rule and file name in a report is untrusted text: control characters are shown
escaped (:func:`~lightning_spectral.gate._common.printable`), GitHub workflow-command syntax
is neutralised and Markdown cells are code spans that stay one cell.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lightning_spectral.gate._common import (
    _fmt,
    _no_commands,
    printable,
    safe_line,
)

if TYPE_CHECKING:
    from lightning_spectral.gate.evaluate import CheckResult


# --------------------------------------------------------------------------- report



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
