"""The reducers of the gate's rules, once: a series of logged values → one number.

``lightning-spectral check`` reduces whole series read from a run (:func:`reduce_values`);
:class:`~lightning_spectral.callbacks.alarm.SpectralAlarm` reduces the series as it grows during
training (:class:`StreamingSeries`, constant memory per tag). Both follow the same rules, and a
test holds them to the same numbers on the same series:

- a series is ordered by step; a value logged again at the step of the previous value
  **replaces** it (the last write of a step wins, as when a run is read back);
- ``last`` / ``first``: the last / first value (NaN included);
- ``min`` / ``max`` / ``mean``: over every value; NaN if any value is NaN;
- ``mean(last=k)``: the mean of the last ``k`` values (fewer if the series is shorter); NaN if
  any of them is NaN;
- an empty series reduces to NaN.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["REDUCERS", "reduce_values", "StreamingSeries"]

#: the reducer names a rule may use (``mean(last=k)`` is ``mean`` with a window)
REDUCERS: tuple[str, ...] = ("last", "first", "min", "max", "mean")


def reduce_values(values: Any, reducer: str, window: int | None = None) -> float:
    """Reduce a series (ordered by step, one value per step) to one number."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan
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
    raise ValueError(f"unknown reducer {reducer!r}; expected one of {', '.join(REDUCERS)}")


class StreamingSeries:
    """One tag's series as it is logged: the same reductions as :func:`reduce_values` on the
    series so far, in constant memory (``window`` recent values are kept for ``mean(last=k)``).

    The values of completed steps are folded into running aggregates; the value of the newest
    step is held apart until a later step arrives, so a rewrite of that step replaces it exactly
    (for ``min`` and ``max`` too).
    """

    __slots__ = ("first", "lo", "hi", "total", "count", "nan", "recent", "last", "step",
                 "version")

    def __init__(self, window: int = 1) -> None:
        self.first = math.nan
        self.lo = math.inf  # aggregates of the completed steps
        self.hi = -math.inf
        self.total = 0.0
        self.count = 0
        self.nan = 0
        self.recent: deque[float] = deque(maxlen=max(int(window), 1))  # completed + newest
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
        elif self.last is not None:
            self._fold(self.last)
        if self.count == 0 and (self.last is None or step == self.step):
            self.first = value
        self.last = value
        self.recent.append(value)
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

    def reduce(self, reducer: str, window: int | None = None) -> float:
        """The reduction of the series so far (see the module docstring)."""
        last = self.last
        if last is None:
            return math.nan
        if window is not None:
            recent = list(self.recent)[-window:]
            return math.fsum(recent) / len(recent)
        if reducer == "last":
            return last
        if reducer == "first":
            return self.first
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
        return {"format": 2, "first": self.first, "lo": self.lo, "hi": self.hi,
                "total": self.total, "count": self.count, "nan": self.nan,
                "recent": list(self.recent), "last": self.last, "step": self.step}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], window: int = 1) -> StreamingSeries:
        series = cls(window)
        for key in ("first", "lo", "hi", "total", "count", "nan", "last", "step"):
            setattr(series, key, state[key])
        series.recent.extend(state["recent"])
        if state.get("format") != 2 and series.count:
            # an older state folded the newest value into the aggregates: take it out again
            last = float(state["last"])
            series.count -= 1
            if math.isnan(last):
                series.nan -= 1
            else:
                series.total -= last
        return series
