"""The reducers of the gate's rules, once: a series of logged values → one number.

``lightning-spectral check`` reduces whole series read from a run (:func:`reduce_values`);
:class:`~lightning_spectral.callbacks.alarm.SpectralAlarm` reduces the series as it grows during
training (:class:`StreamingSeries`, bounded memory per tag). Both follow the same rules, and a
test holds them to the same numbers on the same series:

- a series is ordered by step; a value logged again at the step of the previous value
  **replaces** it (the last write of a step wins, as when a run is read back);
- ``last`` / ``first``: the last / first value (NaN included);
- ``min`` / ``max`` / ``mean``: over every value; NaN if any value is NaN;
- ``mean(last=k)``: the mean of the last ``k`` values (fewer if the series is shorter); NaN if
  any of them is NaN;
- ``slope(last=k)``: the least-squares slope of the last ``k`` values against their steps
  (value change per step; fewer values if the series is shorter). NaN with fewer than two
  values or if any of them is NaN; without steps, the positions 0, 1, 2, ... are the steps;
- ``drop_from_max``: ``max - last``, how far the series has fallen from its peak (0 at a new
  peak); NaN if any value is NaN;
- ``drop_from_max_rel``: ``(max - last) / |max|``, the same drop relative to the peak (0 when
  nothing dropped, ``inf`` for a drop from a peak of exactly 0); NaN if any value is NaN;
- an empty series reduces to NaN.

The trend reducers need no baseline: ``vne/* drop_from_max_rel <= 0.3`` fails once any layer's
entropy has fallen by more than 30 % from its best value.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["REDUCERS", "WINDOWED", "reduce_values", "slope", "drop_from_max_rel",
           "StreamingSeries"]

#: the reducer names a rule may use (``mean(last=k)`` is ``mean`` with a window;
#: ``slope`` always has one: ``slope(last=k)``)
REDUCERS: tuple[str, ...] = ("last", "first", "min", "max", "mean", "slope", "drop_from_max",
                             "drop_from_max_rel")
#: the reducers that take a window ``(last=k)``; ``slope`` requires one
WINDOWED: tuple[str, ...] = ("mean", "slope")


def slope(steps: np.ndarray, values: np.ndarray) -> float:
    """The least-squares slope of ``values`` against ``steps`` (per step): NaN for fewer than
    two points or a NaN value. ``steps`` are distinct (one value per step)."""
    y = np.asarray(values, dtype=np.float64)
    if y.size < 2 or np.isnan(y).any():
        return math.nan
    # steps relative to the last one: exact in float64 for any realistic step count
    x = (np.asarray(steps, dtype=np.int64) - int(steps[-1])).astype(np.float64)
    x -= x.mean()
    denom = float(np.dot(x, x))
    if denom == 0.0:  # pragma: no cover - distinct steps always spread
        return math.nan
    return float(np.dot(x, y - y.mean()) / denom)


def drop_from_max_rel(hi: float, last: float) -> float:
    """``(hi - last) / |hi|``: 0 when nothing dropped, ``inf`` for a drop from a peak of 0,
    NaN when undefined (a NaN, or an infinite peak)."""
    drop = hi - last
    if drop == 0.0:
        return 0.0
    if hi == 0.0:
        return math.inf if drop > 0 else math.nan
    return drop / abs(hi)


def reduce_values(values: Any, reducer: str, window: int | None = None,
                  steps: Any = None) -> float:
    """Reduce a series (ordered by step, one value per step) to one number.

    ``steps`` (the series' steps, same length) are used by ``slope``; without them the
    positions 0, 1, 2, ... stand in. Infinities and overflow give ``inf`` or NaN quietly (no
    RuntimeWarning on stderr).
    """
    with np.errstate(all="ignore"):
        return _reduce(values, reducer, window, steps)


def _reduce(values: Any, reducer: str, window: int | None, steps: Any) -> float:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan
    if reducer == "slope":
        k = v.size if window is None else min(int(window), v.size)
        s = (np.arange(v.size, dtype=np.int64) if steps is None
             else np.asarray(steps, dtype=np.int64))
        return slope(s[-k:], v[-k:])
    if window is not None:
        return float(np.mean(v[-window:]))
    if reducer == "last":
        return float(v[-1])
    if reducer == "first":
        return float(v[0])
    if reducer == "min":
        return float(np.min(v))
    if reducer == "max":
        return float(np.max(v))
    if reducer == "mean":
        return float(np.mean(v))
    if reducer == "drop_from_max":
        return float(np.max(v)) - float(v[-1])
    if reducer == "drop_from_max_rel":
        return drop_from_max_rel(float(np.max(v)), float(v[-1]))
    raise ValueError(f"unknown reducer {reducer!r}; expected one of {', '.join(REDUCERS)}")


class StreamingSeries:
    """One tag's series as it is logged: the same reductions as :func:`reduce_values` on the
    series so far, in bounded memory: running aggregates plus the last ``window`` values and
    their steps (for ``mean(last=k)`` and ``slope(last=k)``).

    The values of completed steps are folded into running aggregates; the value of the newest
    step is held apart until a later step arrives, so a rewrite of that step replaces it exactly
    (for ``min`` and ``max`` too). A value added without a step counts as a new step at the
    next position (0, 1, 2, ...), as :func:`reduce_values` numbers a series without steps.
    """

    __slots__ = ("first", "lo", "hi", "total", "count", "nan", "recent", "xs", "last", "step",
                 "version")

    def __init__(self, window: int = 1) -> None:
        self.first = math.nan
        self.lo = math.inf  # aggregates of the completed steps
        self.hi = -math.inf
        self.total = 0.0
        self.count = 0
        self.nan = 0
        size = max(int(window), 1)
        self.recent: deque[float] = deque(maxlen=size)  # completed + newest
        self.xs: deque[int] = deque(maxlen=size)  # the step of each recent value
        self.last: float | None = None  # the newest step's value (not yet folded in)
        self.step: int | None = None
        self.version = 0

    def __len__(self) -> int:
        return self.count + (self.last is not None)

    def add(self, value: float, step: int | None = None) -> None:
        """Append ``value`` logged at ``step`` (``None``: always a new step)."""
        value = float(value)
        if self.last is not None and step is not None and step == self.step:
            self.recent.pop()  # the newest step is logged again: its value is replaced
            self.xs.pop()
        elif self.last is not None:
            self._fold(self.last)
        if self.count == 0 and (self.last is None or step == self.step):
            self.first = value
        self.last = value
        self.recent.append(value)
        self.xs.append(int(step) if step is not None else self.count)
        self.step = step
        self.version += 1

    def _fold(self, value: float) -> None:
        if math.isnan(value):
            self.nan += 1
        else:
            self.total += value
            self.lo = min(self.lo, value)
            self.hi = max(self.hi, value)
        self.count += 1

    def _max(self, last: float) -> float:
        return math.nan if self.nan or math.isnan(last) else max(self.hi, last)

    def reduce(self, reducer: str, window: int | None = None) -> float:
        """The reduction of the series so far (see the module docstring)."""
        last = self.last
        if last is None:
            return math.nan
        if reducer == "slope" or window is not None:  # the same arithmetic as the gate's
            recent = np.fromiter(self.recent, np.float64, len(self.recent))
            steps = np.fromiter(self.xs, np.int64, len(self.xs))
            k = len(recent) if window is None else min(int(window), len(recent))
            return reduce_values(recent[-k:], reducer, window, steps[-k:])
        if reducer == "last":
            return last
        if reducer == "first":
            return self.first
        if reducer == "drop_from_max":
            return self._max(last) - last
        if reducer == "drop_from_max_rel":
            return drop_from_max_rel(self._max(last), last)
        if self.nan or math.isnan(last):
            return math.nan
        if reducer == "min":
            return min(self.lo, last)
        if reducer == "max":
            return max(self.hi, last)
        if reducer == "mean":
            return (self.total + last) / (self.count + 1)
        raise ValueError(f"unknown reducer {reducer!r}; expected one of {', '.join(REDUCERS)}")

    def state(self) -> dict[str, Any]:
        """Plain values (``weights_only``-loadable) for a checkpoint."""
        return {"format": 3, "first": self.first, "lo": self.lo, "hi": self.hi,
                "total": self.total, "count": self.count, "nan": self.nan,
                "recent": list(self.recent), "xs": list(self.xs), "last": self.last,
                "step": self.step}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], window: int = 1) -> StreamingSeries:
        series = cls(window)
        for key in ("first", "lo", "hi", "total", "count", "nan", "last", "step"):
            setattr(series, key, state[key])
        series.recent.extend(state["recent"])
        fmt = state.get("format")
        if fmt != 2 and fmt != 3 and series.count:
            # an older state folded the newest value into the aggregates: take it out again
            last = float(state["last"])
            series.count -= 1
            if math.isnan(last):
                series.nan -= 1
            else:
                series.total -= last
        xs = state.get("xs")
        if xs is None:  # older states kept no steps: number the recent values by position
            n = len(series)
            xs = range(n - len(series.recent), n)
        series.xs.extend(int(x) for x in xs)
        return series
