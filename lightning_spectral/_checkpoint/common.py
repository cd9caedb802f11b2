"""The error type, one-line messages and the memory budget shared by the loading steps.

Every refusal is a :class:`CheckpointError` whose message is one line (control characters
escaped, long names cut) naming the file and the problem. The memory budget (``--max-bytes`` /
``max_bytes``) defaults to a quarter of the machine's memory (:func:`default_max_bytes`).
"""

from __future__ import annotations

import os
import re

from lightning_spectral.errors import SpectralError

__all__ = [
    "NAME_LIMIT",
    "CheckpointError",
    "budget_of",
    "default_max_bytes",
    "error",
    "format_bytes",
    "over_budget",
    "parse_bytes",
    "printable",
    "sized",
]

NAME_LIMIT = 120  # characters of a tensor name or refused global printed in an error
_FALLBACK_TOTAL_MEMORY = 8 * 1024**3  # assumed when the machine's memory cannot be read
_BUDGET_FRACTION = 4  # default memory budget: 1/4 of the machine's (or cgroup's) memory


class CheckpointError(SpectralError, ValueError):
    """A file could not be read as a checkpoint or holds no weight matrices."""


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with control characters (ANSI escapes, newlines) escaped, optionally cut."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                  for ch in str(text))
    if limit is not None and len(out) > limit:
        out = out[:limit] + "..."
    return out


def error(message: str) -> CheckpointError:
    """A :class:`CheckpointError` with ``message`` made one printable line."""
    return CheckpointError(printable(message))


def _total_memory() -> int | None:
    """Physical memory, or the cgroup's memory limit when that is lower; ``None`` if unknown."""
    sizes: list[int] = []
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and page > 0:
            sizes.append(pages * page)
    except (AttributeError, ValueError, OSError):
        pass
    if not sizes:
        try:
            with open("/proc/meminfo", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("MemTotal:"):
                        sizes.append(int(line.split()[1]) * 1024)
                        break
        except (OSError, ValueError, IndexError):
            pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file, encoding="ascii") as fh:
                value = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if 0 < value < (sizes[0] if sizes else 2**62):
            sizes.append(value)
    return min(sizes) if sizes else None


def default_max_bytes() -> int:
    """The default memory budget: a quarter of the machine's memory (or of its cgroup limit).

    Read from ``os.sysconf``, else ``/proc/meminfo``; 2 GiB (a quarter of 8 GiB) when neither
    is available.
    """
    return (_total_memory() or _FALLBACK_TOTAL_MEMORY) // _BUDGET_FRACTION


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """A memory size: a byte count or a number with a binary unit, ``512M``, ``4G``, ``1.5GiB``.

    ``K``/``M``/``G``/``T``/``P`` (optionally followed by ``B`` or ``iB``) are powers of 1024.
    Raises ``ValueError`` unless the result is a positive integer.
    """
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        if match is None:
            raise ValueError(f"not a size: {text!r} (expected bytes or a number with K, M, G or "
                             "T, e.g. 512M, 4G)")
        number, unit = match.group(1), match.group(2).lower()
        value = int(float(number) * 1024 ** "_kmgtp".index(unit or "_")) if unit else int(
            float(number))
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units with three significant digits (``1.49 GiB``)."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.0f} EiB" if value < 1e6 else f"{value:.3g} EiB"


def sized(n: int) -> str:
    """``n bytes``, with binary units from 1 KiB on: ``2048 bytes (2 KiB)``."""
    return f"{n} bytes" if n < 1024 else f"{n} bytes ({format_bytes(n)})"


def budget_of(max_bytes: int | str | None) -> int:
    """The budget in bytes: ``max_bytes`` parsed, or :func:`default_max_bytes` for None."""
    return default_max_bytes() if max_bytes is None else parse_bytes(max_bytes)


def over_budget(budget: int) -> str:
    """The end of a refusal: ``over the memory budget of 2 GiB (--max-bytes / max_bytes)``."""
    return f"over the memory budget of {format_bytes(budget)} (--max-bytes / max_bytes)"

