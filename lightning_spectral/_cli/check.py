"""``lightning-spectral check``: gate a CI job on the spectral metrics a training logged.

Exit status: 0 every check passed; 1 a check failed; 2 bad input (malformed rule, rule matching
no tag, unreadable or corrupt run, empty run), reported as one line on stderr. Only the standard
library and NumPy are imported on this path (no torch, no Lightning, no TensorBoard).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]

_EPILOG = """\
rules: TAG_PATTERN [REDUCER] OP VALUE, e.g.
  'vne/encoder.* >= 2.0'   'collapse/nc1 last < 0.5'   'erank/* min > 4'
  'weight_stable_rank/fc2 mean(last=5) <= 30'
reducers: last (default), first, min, max, mean, mean(last=K); ops: < <= > >= == !=
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
    parser.add_argument("--format", choices=("text", "json", "github"), default="text",
                        help="report format on stdout (default: text)")
    parser.add_argument("--junit", type=Path, metavar="FILE.xml",
                        help="also write a JUnit XML report (one test case per check)")
    parser.set_defaults(func=run)

    def one_line_error(message: str) -> None:  # argparse prints usage + error: keep one line
        print(f"lightning-spectral check: error: {message} "
              "(see lightning-spectral check --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error  # type: ignore[method-assign]
    return parser


def _bad_input(message: str) -> int:
    one_line = " ".join(str(message).split())
    print(f"lightning-spectral check: error: {one_line}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the gate for parsed ``args``; returns the exit status."""
    from lightning_spectral.gate import GateInputError, check, load_rules, parse_rule, read_run

    try:
        rules = [parse_rule(text, source="--rule") for text in args.rule]
        for path in args.rules:
            rules.extend(load_rules(path))
        if not rules:
            return _bad_input("no rules: give --rule 'TAG_PATTERN [REDUCER] OP VALUE' "
                              "or --rules FILE.toml")
        runs = [read_run(path) for path in args.runs]
        report = check(runs, rules)
    except GateInputError as exc:
        return _bad_input(str(exc))
    if args.format == "json":
        print(report.to_json())
    elif args.format == "github":
        print(report.to_github())
    else:
        print(report.to_text())
    if args.junit is not None:
        try:
            args.junit.parent.mkdir(parents=True, exist_ok=True)
            args.junit.write_text(report.to_junit(), encoding="utf-8")
        except OSError as exc:
            return _bad_input(f"{args.junit}: cannot write JUnit report ({exc.strerror or exc})")
    return 0 if report.passed else 1
