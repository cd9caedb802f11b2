"""What every part of the gate shares: the comparison operators, the exceptions, the
escaping of untrusted text for reports and numbers' display form."""

from __future__ import annotations

import math
import re
from typing import Any

from lightning_spectral.errors import SpectralConfigError, SpectralError

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



def _fmt(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.6g}"

