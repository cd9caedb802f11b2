"""Behaviour shared by the callbacks: fail soft (NaN + one warning) unless ``strict``, and the
wall-time budget of figures."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator

from lightning_spectral.errors import SpectralComputeError, SpectralWarning


class FailSoft:
    """Records problems: raises when ``strict``, else warns once per ``key`` and carries on."""

    def __init__(self, strict: bool, owner: str) -> None:
        self.strict = bool(strict)
        self.owner = owner
        self._warned: set[str] = set()

    def problem(self, key: str, message: str) -> None:
        """Report that a metric could not be computed (it is logged as NaN by the caller)."""
        text = f"{self.owner}: {message}"
        if self.strict:
            raise SpectralComputeError(text)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(text + " (logged as NaN; further warnings of this kind suppressed)",
                          SpectralWarning, stacklevel=3)


class FigureClock:
    """The figure budget shared by the callbacks that draw (``figure_budget`` attributes).

    ``start()`` at the beginning of training; wrap each drawing in ``with clock.timed():``;
    ``allowed(budget)`` is true for the first figure and then while drawing has used at most
    ``budget`` of the wall time since ``start()``.
    """

    def __init__(self) -> None:
        self.t0: float | None = None
        self.seconds = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds = 0.0

    def allowed(self, budget: float) -> bool:
        if self.t0 is None or self.seconds == 0.0:
            return True
        return self.seconds <= budget * (time.perf_counter() - self.t0)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - begin
