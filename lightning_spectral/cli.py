"""The ``lightning-spectral`` command.

Subcommands live in ``lightning_spectral._cli.<name>``; each module defines
``add_parser(subparsers) -> argparse.ArgumentParser`` and sets ``func`` (a callable taking the
parsed namespace and returning the exit code) as a parser default. Heavy imports (torch,
Lightning) happen inside the subcommand, so ``--help`` and ``--version`` start fast.

Exit codes: 0 success, 1 a check failed, 2 bad input (one line on stderr naming the file, tag or
rule), 130 interrupted (Ctrl-C). Whatever goes wrong, no traceback is printed: an exception a
subcommand did not expect becomes the single line
``lightning-spectral <command>: internal error: <Type>: <message>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from lightning_spectral._version import __version__

SUBCOMMANDS: tuple[str, ...] = ("check", "analyze", "align")

# control characters, line separators, bidirectional overrides, surrogates: shown escaped
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e"
                      "\u2066-\u2069\ufeff\ufffe\uffff\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one_line(text: str) -> str:
    """``text`` on one line, control characters escaped (``\\n``, ``\\x1b``)."""
    def escape(m: re.Match) -> str:
        c = m.group(0)
        return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    text = _CONTROL.sub(escape, text).replace("##[", "##\\x5b")
    return "\\x3a" + text[1:] if text.lstrip().startswith("::") else text


def _stderr_line(text: str) -> None:
    stream = sys.stderr
    if stream is None:  # pragma: no cover - no stderr at all
        return
    line = _one_line(text) + "\n"
    try:
        try:
            stream.write(line)
        except UnicodeEncodeError:
            encoding = getattr(stream, "encoding", None) or "utf-8"
            stream.write(line.encode(encoding, "backslashreplace").decode(encoding))
        stream.flush()
    except (OSError, ValueError):  # pragma: no cover - stderr closed: nothing to tell
        pass


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser. A subcommand module that fails to import is left out, unless it
    is ``command`` (then the error propagates)."""
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
        except ModuleNotFoundError as exc:  # a subcommand module absent from this installation
            if exc.name != f"lightning_spectral._cli.{name}" and name == command:
                raise
            continue
        except Exception:  # a broken subcommand must not take the others down
            if name == command:
                raise
            continue
        module.add_parser(sub)

    def one_line_error(message: str) -> NoReturn:  # argparse prints usage + error: keep one line
        _stderr_line(f"lightning-spectral: error: {message} (see lightning-spectral --help)")
        sys.exit(2)

    parser.error = one_line_error  # type: ignore[method-assign]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in SUBCOMMANDS else None
    prog = "lightning-spectral" + (f" {command}" if command else "")
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            return 0
        return int(func(args) or 0)
    except KeyboardInterrupt:
        _stderr_line(f"{prog}: interrupted")
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`... | head`)
        if sys.stdout is sys.__stdout__ and sys.stdout is not None:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError):  # pragma: no cover
                pass
        _stderr_line(f"{prog}: error: output closed before it was written (broken pipe)")
        return 2
    except Exception as exc:  # the last resort: one line, never a traceback
        _stderr_line(f"{prog}: internal error: {type(exc).__name__}: {exc}")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
