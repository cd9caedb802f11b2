"""The ``lightning-spectral`` command.

Subcommands live in ``lightning_spectral._cli.<name>``; each module defines
``add_parser(subparsers) -> argparse.ArgumentParser`` and sets ``func`` (a callable taking the
parsed namespace and returning the exit code) as a parser default. Heavy imports (torch,
Lightning) happen inside the subcommand, so ``--help`` and ``--version`` start fast.

Exit codes: 0 success, 1 a check failed, 2 bad input (one line on stderr naming the file, tag or
rule).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lightning_spectral._version import __version__

SUBCOMMANDS: tuple[str, ...] = ("check", "analyze", "align")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-spectral",
        description="Spectral health of neural networks: gate CI on logged spectral metrics, "
        "analyze checkpoints, align models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"lightning_spectral._cli.{name}")
        except ModuleNotFoundError as exc:  # a subcommand not built yet
            if exc.name != f"lightning_spectral._cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
