"""The mathematics of lightning_spectral: pure torch functions, no Lightning import.

Every function documents its formula and the section of ``docs/definitions.md`` it implements,
validates shapes (``ValueError`` naming the shape got and wanted), returns NaN for
mathematically undefined inputs, and computes on its input's device in float32 by default
(``dtype`` for float64).

Modules (anchors of ``docs/definitions.md``): ``spectrum`` (#spectra, #vne), ``weights``
(#stable-rank, #weights), ``interplay`` (#interplay), ``collapse`` (#collapse), ``curvature``
and ``symmetry`` (#symmetry), ``mirrors`` (#mirrors), ``powerlaw`` (#heavy-tail),
``selfsupervised`` (the I-VNE⁺ objective). Names are imported lazily.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from lightning_spectral import _module_all

#: the public submodules: every module of this package without a leading underscore
_MODULES: tuple[str, ...] = tuple(sorted(
    m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
))

#: public name -> submodule defining it, from each submodule's ``__all__`` (read from its
#: source, without importing it); a submodule's new name is exported with no edit here
_LAZY: dict[str, str] = {
    name: module for module in _MODULES for name in _module_all(f"{__name__}.{module}")
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_MODULES))
