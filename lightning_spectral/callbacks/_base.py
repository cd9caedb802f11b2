"""Behaviour shared by every callback: fail soft (NaN + one warning) unless ``strict``."""

from __future__ import annotations

import warnings

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
