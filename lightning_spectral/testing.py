"""Helpers for testing code that uses lightning_spectral (in your own pytest suite, too).

:class:`MemoryLogger` is a Lightning logger that keeps every ``log_metrics`` call in memory, so a
test can assert on what the monitors logged without reading event files::

    logger = MemoryLogger()
    trainer = pl.Trainer(logger=logger, callbacks=[SpectralMonitor(every_n_steps=10)])
    trainer.fit(model, loader)
    assert logger.last("vne/encoder") > 1.0

For thresholds over a finished run written by a real logger, use
:func:`lightning_spectral.gate.check` instead.
"""

from __future__ import annotations

from typing import Any

from lightning_spectral._compat import pl

__all__ = ["MemoryLogger"]


class MemoryLogger(pl.loggers.logger.Logger):
    """Keeps every ``log_metrics`` call as ``(step, {tag: value})`` in :attr:`records`."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyper-parameters are not recorded."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((int(step or 0), dict(metrics)))

    def series(self, tag: str) -> dict[int, float]:
        """``{step: value}`` of one tag (the last value wins if a step repeats)."""
        return {step: m[tag] for step, m in self.records if tag in m}

    def tags(self) -> set[str]:
        """Every tag logged so far."""
        return {tag for _, m in self.records for tag in m}

    def last(self, tag: str) -> float:
        """The value of ``tag`` at its latest step; ``KeyError`` if it was never logged."""
        series = self.series(tag)
        if not series:
            raise KeyError(f"{tag!r} was never logged; logged tags: {sorted(self.tags())}")
        return series[max(series)]
