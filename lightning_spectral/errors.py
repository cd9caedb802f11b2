"""Library exceptions and warnings.

Every error the library raises on purpose derives from :class:`SpectralError`, so users can
catch ours apart from their own. User mistakes that can be detected before training
(unknown layer name, missing head, malformed rule) raise :class:`SpectralConfigError`.
"""

from __future__ import annotations


class SpectralError(Exception):
    """Base class of every error raised by lightning_spectral."""


class SpectralConfigError(SpectralError, ValueError):
    """A configuration mistake detected at construction or ``setup`` time."""


class SpectralComputeError(SpectralError, RuntimeError):
    """A metric could not be computed and the user asked for ``strict=True``."""


class SpectralWarning(UserWarning):
    """Warning category for metrics that could not be computed (logged as NaN instead)."""
