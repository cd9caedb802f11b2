"""lightning_spectral: Lightning callbacks that watch a network's spectral health.

The package root imports lazily, so ``lightning-spectral --help`` and ``import
lightning_spectral.functional`` do not pay for importing Lightning. See ``../SPEC.md`` (shared)
for the mathematics of every quantity and ``docs/metrics.md`` for every logged tag.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_spectral._version import __version__
from lightning_spectral.errors import (
    SpectralComputeError,
    SpectralConfigError,
    SpectralError,
    SpectralWarning,
)

# public name -> module that defines it (imported on first access)
_LAZY = {
    "SpectralMonitor": "lightning_spectral.callbacks.spectral",
    "VNEPenalty": "lightning_spectral.callbacks.penalty",
    "CollapseMonitor": "lightning_spectral.callbacks.collapse",
    "SpectralAlarm": "lightning_spectral.callbacks.alarm",
    "SpectralAlarmError": "lightning_spectral.callbacks.alarm",
    "analyze_state_dict": "lightning_spectral.analysis",
    "CurvatureMonitor": "lightning_spectral.callbacks.curvature",
    "MirrorCertificate": "lightning_spectral.callbacks.mirrors",
    "MirrorNet": "lightning_spectral.functional.mirrors",
    "compress": "lightning_spectral.compression",
    "compression_curve": "lightning_spectral.compression",
    "functional": "lightning_spectral.functional",
    "gate": "lightning_spectral.gate",
}

__all__ = [
    "__version__",
    "SpectralError",
    "SpectralConfigError",
    "SpectralComputeError",
    "SpectralWarning",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_spectral' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
