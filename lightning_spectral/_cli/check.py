"""``lightning-spectral check``: gate a CI job on the spectral metrics a training logged.

Rules compare with numbers or, with ``--baseline BASE_RUN``, with the same tag's reduced value in
a baseline run (``erank/* last >= 0.8 * baseline``). Exit status: 0 every check passed; 1 a check
failed (a tag missing from the baseline fails a baseline rule unless it is optional); 2 bad
input (malformed rule, rule matching no tag, unreadable, corrupt, special or empty run or
baseline, a baseline rule without ``--baseline``, bad rules file), reported as one line on
stderr naming the file, tag or rule. Special files inside a run (FIFOs, sockets, devices) are
skipped and an event file's incomplete last record is ignored, each with a one-line warning on
stderr. Every line written is escaped (control characters as ``\\n``, ``\\x1b``) so a tag can
neither break the report nor pass for a CI workflow command. Only the standard library and
NumPy are imported on this path (no torch, no Lightning, no TensorBoard).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import NoReturn, TextIO

__all__ = ["add_parser", "run"]

_PROG = "lightning-spectral check"
_EPILOG = """\
rules: TAG_PATTERN [REDUCER] OP THRESHOLD, e.g.
  'vne/encoder.* >= 2.0'   'collapse/nc1 last < 0.5'   'erank/* min > 4'
  'weight_stable_rank/fc2 mean(last=5) <= 30'   'vne/* drop_from_max_rel <= 0.3'
  'erank/* last >= 0.8 * baseline'   'vne/classifier mean(last=5) >= baseline - 0.1'
reducers: last (default), first, min, max, mean, mean(last=K), slope(last=K),
  drop_from_max (max - last), drop_from_max_rel ((max - last) / |max|)
ops: < <= > >= == !=
threshold: NUMBER | [NUMBER '*'] baseline [(+|-) NUMBER]   (baseline: the same reducer on the
  same tag of --baseline BASE_RUN; a tag the baseline lacks fails, or skips if optional)
rules file (TOML): [[rule]] check = "..."  [optional = true]  [name = "..."]
exit status: 0 all passed, 1 a check failed, 2 bad input
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check",
        help="pass or fail on thresholds over logged metrics (TensorBoard or CSV runs)",
        description="Evaluate threshold rules over every value a run logged "
        "(TensorBoard event files or a CSVLogger metrics.csv) and exit 0 (pass), "
        "1 (a check failed) or 2 (bad input).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="a log version directory, a directory with event files, "
                        "or a metrics.csv")
    parser.add_argument("--rule", action="append", default=[], metavar="RULE",
                        help="a rule (repeatable)")
    parser.add_argument("--rules", action="append", default=[], metavar="FILE.toml",
                        type=Path, help="a TOML rules file (repeatable)")
    parser.add_argument("--baseline", type=Path, metavar="BASE_RUN",
                        help="a run to compare with: rules may use 'baseline', the same "
                        "reducer on the same tag of this run (every RUN is compared with it)")
    parser.add_argument("--format", choices=("text", "json", "github", "markdown"),
                        default="text",
                        help="report format on stdout (default: text; markdown: a table for a "
                        "pull-request comment or $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--junit", type=Path, metavar="FILE.xml",
                        help="also write a JUnit XML report (one test case per check)")
    parser.set_defaults(func=run)

    def one_line_error(message: str) -> NoReturn:  # argparse prints usage + error: keep one line
        _line(sys.stderr, f"{_PROG}: error: {message} (see {_PROG} --help)")
        sys.exit(2)

    parser.error = one_line_error
    return parser


def _safe(text: str) -> str:
    from lightning_spectral.gate import safe_line

    return safe_line(text)


def _line(stream: TextIO, text: str) -> None:
    """Write one escaped line; an encoding that cannot show a character gets it escaped."""
    _write(stream, _safe(text) + "\n")


def _write(stream: TextIO, text: str) -> None:
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "utf-8"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
    stream.flush()


def _bad_input(message: str) -> int:
    _line(sys.stderr, f"{_PROG}: error: {message}")
    return 2


def _write_report(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` without ever blocking on a FIFO that nobody reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO with no reader
            raise OSError(exc.errno, "a FIFO that nobody reads") from exc
        raise
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    with open(fd, "w", encoding="utf-8", closefd=True) as handle:
        handle.write(text)


def _silence_stdout() -> None:
    """The reader of stdout went away (``check ... | head``): drop the rest of the output, so
    that exiting does not print a BrokenPipeError."""
    if sys.stdout is sys.__stdout__ and sys.stdout is not None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # pragma: no cover - nothing more to do
            pass


def run(args: argparse.Namespace) -> int:
    """Run the gate for parsed ``args``; returns the exit status."""
    from lightning_spectral import gate

    try:
        rules = [gate.parse_rule(text, source="--rule") for text in args.rule]
        for path in args.rules:
            rules.extend(gate.load_rules(path))
        if not rules:
            return _bad_input("no rules: give --rule 'TAG_PATTERN [REDUCER] OP THRESHOLD' "
                              "or --rules FILE.toml")
        if args.baseline is None:
            gate.require_baseline(rules, "give --baseline BASE_RUN")
            baseline = None
        else:
            try:
                baseline = gate.read_run(args.baseline)
            except gate.RunReadError as exc:
                return _bad_input(f"baseline {exc}")
        runs = [gate.read_run(path) for path in args.runs]
        report = gate.check(runs, rules, baseline=baseline)
    except gate.GateInputError as exc:
        return _bad_input(str(exc))
    for warning in report.warnings:
        _line(sys.stderr, f"{_PROG}: warning: {warning}")
    if args.format == "json":
        out = report.to_json()
    elif args.format == "github":
        out = report.to_github()
    elif args.format == "markdown":
        out = report.to_markdown()
    else:
        out = report.to_text()
    try:
        _write(sys.stdout, out + "\n")
    except BrokenPipeError:
        _silence_stdout()
    if args.junit is not None:
        try:
            _write_report(args.junit, report.to_junit())
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            return _bad_input(f"{args.junit}: cannot write JUnit report ({reason})")
    return 0 if report.passed else 1
