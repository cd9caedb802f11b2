"""Reading logged runs: :func:`read_run` turns a TensorBoard log directory, an event file or a
CSV file (Lightning's CSVLogger ``metrics.csv``) into a :class:`Run` of per-tag
:class:`Series` (every value kept, merged by step).

Only regular files and directories are read; special files inside a run are skipped with a
warning in ``Run.warnings``; every unreadable or malformed input raises :class:`RunReadError`
naming the file. Event files are decoded by :mod:`lightning_spectral._eventfile`.
"""

from __future__ import annotations

import csv
import decimal
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_spectral._eventfile import file_kind, open_regular
from lightning_spectral.gate._common import (
    RunReadError,
)

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
    warnings: list[str] = field(default_factory=list)  # what was skipped or ignored, and why

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


_EVENTS_PREFIX = "events.out.tfevents"


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _list_dir(directory: Path) -> list[os.DirEntry]:
    """The entries of ``directory`` sorted by name (OSError when it cannot be listed)."""
    with os.scandir(directory) as entries:
        return sorted(entries, key=lambda e: e.name)


def _is_real_dir(entry: os.DirEntry) -> bool:
    """A sub-directory to search (symbolic links to directories are not followed)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


class _Candidates:
    """What a directory walk found: event files by directory, metrics.csv files, what it
    skipped (special files, with a warning) and the directories it could not list."""

    def __init__(self, warnings: list[str]) -> None:
        self.events: dict[Path, list[Path]] = {}
        self.csvs: list[Path] = []
        self.skipped: list[str] = []
        self.unreadable: list[tuple[Path, OSError]] = []
        self.warnings = warnings

    def add(self, directory: Path, entry: os.DirEntry) -> None:
        name = entry.name
        is_events = name.startswith(_EVENTS_PREFIX)
        if not is_events and name != "metrics.csv":
            return
        path = directory / name
        try:
            mode = os.stat(path).st_mode  # follows a symbolic link to a file
        except OSError as exc:
            self._skip(path, f"cannot access ({_reason(exc)})")
            return
        if stat.S_ISDIR(mode):
            return
        if not stat.S_ISREG(mode):
            self._skip(path, f"not a regular file ({file_kind(mode)})")
            return
        if is_events:
            self.events.setdefault(directory, []).append(path)
        else:
            self.csvs.append(path)

    def _skip(self, path: Path, why: str) -> None:
        self.skipped.append(f"{path}: {why}")
        self.warnings.append(f"{path}: skipped, {why}")


def _read_directory(path: Path, label: str, warnings: list[str]) -> Run:
    try:
        top = _list_dir(path)
    except OSError as exc:
        raise RunReadError(f"{path}: cannot list directory ({_reason(exc)})") from exc
    here = _Candidates(warnings)
    for entry in top:
        here.add(path, entry)
    if path in here.events:
        return _read_event_dir(path, here.events[path], label, warnings)
    if here.csvs:
        return _read_csv(here.csvs[0], label, warnings)
    # a Lightning layout: the run sits in one sub-directory (links to directories not followed)
    found = _Candidates(warnings)
    found.skipped = here.skipped
    stack = [path / e.name for e in reversed(top) if _is_real_dir(e)]
    while stack:
        directory = stack.pop()
        try:
            entries = _list_dir(directory)
        except OSError as exc:
            found.unreadable.append((directory, exc))
            continue
        for entry in entries:
            found.add(directory, entry)
        stack.extend(directory / e.name for e in reversed(entries) if _is_real_dir(e))
    if found.unreadable:
        directory, error = found.unreadable[0]
        more = (f" (and {len(found.unreadable) - 1} more)" if len(found.unreadable) > 1
                else "")
        raise RunReadError(f"{directory}: cannot list directory ({_reason(error)}){more}; "
                           f"cannot tell which run under {path} to read")
    holders = sorted(found.events)
    if len(holders) == 1:
        return _read_event_dir(holders[0], found.events[holders[0]], label, warnings)
    if len(holders) > 1:
        shown = ", ".join(str(h) for h in holders[:5]) + (" ..." if len(holders) > 5 else "")
        raise RunReadError(f"{path}: holds several runs ({shown}); pass one of them")
    csvs = sorted(found.csvs)
    if len(csvs) == 1:
        return _read_csv(csvs[0], label, warnings)
    if len(csvs) > 1:
        raise RunReadError(f"{path}: holds several metrics.csv files "
                           f"({', '.join(str(c) for c in csvs[:5])}); pass one of them")
    skipped = f"; skipped {'; '.join(found.skipped[:3])}" if found.skipped else ""
    raise RunReadError(f"{path}: no TensorBoard event files or metrics.csv (empty run"
                       f"{skipped})")


def _read_event_dir(directory: Path, files: list[Path], label: str,
                    warnings: list[str] | None = None) -> Run:
    from lightning_spectral._eventfile import EventFileError, read_scalars

    warnings = [] if warnings is None else warnings
    loaded = []
    for path in sorted(files):
        try:
            rec = read_scalars(path, allow_truncated=True)
        except EventFileError as exc:
            raise RunReadError(f"{exc.path}: unreadable event file: {exc.reason}") from exc
        if rec.truncated_at is not None:
            warnings.append(f"{path}: ignored an incomplete last record at byte "
                            f"{rec.truncated_at} (file is {rec.file_size} bytes: still being "
                            "written, or cut short)")
        loaded.append((path, rec))
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
    return Run(scalars=scalars, label=label, files=[str(p) for p, _ in loaded],
               warnings=warnings)


_INT64 = 1 << 63


def _csv_step(cell: str, where: str) -> int:
    """The exact integer step of a CSV cell; a fraction, a non-finite or an out-of-range value
    is refused (``where`` is ``file:line``)."""
    if not cell:
        raise RunReadError(f"{where}: column 'step' is empty in a row with values")
    try:
        step = int(cell)
    except ValueError:
        try:
            exact = decimal.Decimal(cell)
        except decimal.InvalidOperation:
            raise RunReadError(f"{where}: column 'step' value {cell!r} is not a number"
                               ) from None
        if not exact.is_finite():
            raise RunReadError(f"{where}: column 'step' value {cell!r} is not finite") from None
        if exact.adjusted() > 18:
            raise RunReadError(f"{where}: column 'step' value {cell!r} is out of range "
                               "(steps are 64-bit integers)") from None
        if exact != exact.to_integral_value():
            raise RunReadError(f"{where}: column 'step' value {cell!r} is not a whole number"
                               ) from None
        step = int(exact)
    if not -_INT64 <= step < _INT64:
        raise RunReadError(f"{where}: column 'step' value {cell!r} is out of range (steps "
                           "are 64-bit integers)")
    return step


def _read_csv(path: Path, label: str, warnings: list[str] | None = None) -> Run:
    try:
        handle = open_regular(path, "r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise RunReadError(f"{path}: cannot read ({_reason(exc)})") from exc
    columns: dict[str, tuple[list[int], list[float]]] = {}
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise RunReadError(f"{path}: empty metrics file") from None
        except (csv.Error, UnicodeDecodeError, OSError) as exc:
            raise RunReadError(f"{path}: not a CSV file ({_reason(exc)})") from exc
        header = [h.strip() for h in header]
        first: dict[str, int] = {}
        for j, name in enumerate(header):
            if name in first and name:
                raise RunReadError(f"{path}:{reader.line_num}: column {name!r} appears twice "
                                   f"(columns {first[name] + 1} and {j + 1}); cannot tell "
                                   "which one to read")
            first.setdefault(name, j)
        step_col = first.get("step")
        try:
            for row_no, row in enumerate(reader):
                line = reader.line_num
                if not row:
                    continue
                if len(row) > len(header):
                    raise RunReadError(f"{path}:{line}: {len(row)} cells but {len(header)} "
                                       "columns in the header")
                cells = [(j, c.strip()) for j, c in enumerate(row) if j != step_col]
                cells = [(j, c) for j, c in cells if c]
                if not cells:
                    continue
                step = row_no
                if step_col is not None:
                    cell = row[step_col].strip() if step_col < len(row) else ""
                    step = _csv_step(cell, f"{path}:{line}")
                for j, cell in cells:
                    if not header[j]:
                        raise RunReadError(f"{path}:{line}: value {cell!r} in column {j + 1}, "
                                           "which has no name in the header")
                    try:
                        value = float(cell)
                    except ValueError:
                        raise RunReadError(f"{path}:{line}: column {header[j]!r} value "
                                           f"{cell!r} is not a number") from None
                    col = columns.setdefault(header[j], ([], []))
                    col[0].append(step)
                    col[1].append(value)
        except (csv.Error, UnicodeDecodeError, OSError) as exc:
            raise RunReadError(f"{path}: not a readable CSV file ({_reason(exc)})") from exc
    if not columns:
        raise RunReadError(f"{path}: no logged values (empty run)")
    scalars = {
        tag: _dedupe(np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
        for tag, (s, v) in columns.items()
    }
    return Run(scalars=scalars, label=label, files=[str(path)],
               warnings=[] if warnings is None else warnings)


def read_run(path: str | os.PathLike[str], label: str | None = None) -> Run:
    """Read every scalar of a run.

    ``path`` is a Lightning log version directory, any directory holding TensorBoard event
    files, a directory whose event files all sit in one sub-directory, or a CSVLogger
    ``metrics.csv`` (the file or its directory). Several event files are merged by step,
    ordered by the wall time of their first event: a step written twice (as after a resumed
    run) keeps the latest write. Steps an interrupted run wrote beyond the point a resumed run
    reached are kept, as TensorBoard shows them.

    Only regular files and directories are read: a FIFO, socket or device named like an
    event file or ``metrics.csv`` inside the run is skipped, and an event file's incomplete
    last record (a file still being written) is ignored; both are reported in
    ``Run.warnings``. Raises :class:`RunReadError` naming the file for anything missing,
    empty, unreadable, corrupt or out of range.
    """
    path = Path(path)
    label = label or str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise RunReadError(f"{path}: no such file or directory") from None
    except OSError as exc:
        raise RunReadError(f"{path}: cannot access ({_reason(exc)})") from exc
    except ValueError as exc:  # an embedded NUL
        raise RunReadError(f"{path}: invalid path ({exc})") from exc
    warnings: list[str] = []
    if stat.S_ISREG(mode):
        if path.name.startswith(_EVENTS_PREFIX):
            return _read_event_dir(path.parent, [path], label, warnings)
        return _read_csv(path, label, warnings)
    if stat.S_ISDIR(mode):
        return _read_directory(path, label, warnings)
    raise RunReadError(f"{path}: not a regular file or directory ({file_kind(mode)})")
