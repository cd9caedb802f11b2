"""lightning_spectral: Lightning callbacks that watch a network's spectral health.

The package root imports lazily, so ``lightning-spectral --help`` and ``import
lightning_spectral.functional`` do not pay for importing Lightning. ``docs/definitions.md``
defines every quantity and ``docs/metrics.md`` lists every logged tag.

The root's public names are taken from the ``__all__`` of the modules that define them
(``_SOURCES`` below), read from their source without importing them; a module is imported on
the first access to one of its names. ``tests/test_public_api.py`` checks that every name
resolves, is documented and is still in its module's ``__all__``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from typing import TYPE_CHECKING, Any

from lightning_spectral._version import __version__
from lightning_spectral.errors import (
    SpectralComputeError,
    SpectralConfigError,
    SpectralError,
    SpectralWarning,
)

if TYPE_CHECKING:  # what type checkers and IDEs see; the same names resolve lazily at run time
    from lightning_spectral import functional as functional
    from lightning_spectral import gate as gate
    from lightning_spectral.analysis import analyze_state_dict as analyze_state_dict
    from lightning_spectral.callbacks.alarm import SpectralAlarm as SpectralAlarm
    from lightning_spectral.callbacks.alarm import SpectralAlarmError as SpectralAlarmError
    from lightning_spectral.callbacks.collapse import CollapseMonitor as CollapseMonitor
    from lightning_spectral.callbacks.curvature import CurvatureMonitor as CurvatureMonitor
    from lightning_spectral.callbacks.mirrors import MirrorCertificate as MirrorCertificate
    from lightning_spectral.callbacks.penalty import VNEPenalty as VNEPenalty
    from lightning_spectral.callbacks.spectral import SpectralMonitor as SpectralMonitor
    from lightning_spectral.compression import compress as compress
    from lightning_spectral.compression import compression_curve as compression_curve
    from lightning_spectral.models import MirrorNet as MirrorNet
    from lightning_spectral.models import ReluMirrorNet as ReluMirrorNet

#: Where the root's lazy names come from: a module and either ``"*"`` (every name of its
#: ``__all__``) or the names of its ``__all__`` that the root re-exports. Order matters only
#: for ``__all__``'s order; a name is taken from the first module that lists it.
_SOURCES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    ("lightning_spectral.callbacks.spectral", ("SpectralMonitor",)),
    ("lightning_spectral.callbacks.penalty", ("VNEPenalty",)),
    ("lightning_spectral.callbacks.collapse", "*"),
    ("lightning_spectral.callbacks.alarm", "*"),
    ("lightning_spectral.callbacks.curvature", "*"),
    ("lightning_spectral.callbacks.mirrors", "*"),
    ("lightning_spectral.models", "*"),
    ("lightning_spectral.analysis", ("analyze_state_dict",)),
    ("lightning_spectral.compression", ("compress", "compression_curve")),
)

#: subpackages and modules the root exposes as attributes
_SUBMODULES: tuple[str, ...] = ("functional", "gate")

_ALL_ASSIGNMENT = re.compile(r"^__all__\s*(?::[^=\n]*)?=", re.MULTILINE)


def _static_all(module: str) -> tuple[str, ...] | None:
    """The literal ``__all__`` of ``module``, read from its source without executing it.

    Only the ``__all__ = [...]`` statement is parsed (no import, no full parse), so this costs
    well under a millisecond. ``None`` when the module has no source (an installation without
    ``.py`` files) or its ``__all__`` is not a literal list or tuple of strings.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    try:
        with open(spec.origin, encoding="utf-8") as fh:
            source = fh.read()
    except OSError:
        return None
    match = _ALL_ASSIGNMENT.search(source)
    if match is None:
        return None
    lines = source[match.start():].splitlines()
    for end in range(1, min(len(lines), 400) + 1):  # the shortest prefix that parses
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        node = tree.body[0]
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        try:
            names = ast.literal_eval(value) if value is not None else None
        except ValueError:
            return None
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            return tuple(names)
        return None
    return None


def _module_all(module: str) -> tuple[str, ...]:
    """``module.__all__``: statically when possible, else by importing the module."""
    names = _static_all(module)
    if names is None:
        names = tuple(getattr(importlib.import_module(module), "__all__", ()))
    return names


def _lazy_table() -> dict[str, str]:
    """Public name -> module that defines it, in ``_SOURCES`` order."""
    table: dict[str, str] = {}
    for module, wanted in _SOURCES:
        names = _module_all(module) if wanted == "*" else wanted
        for name in names:
            table.setdefault(name, module)
    for sub in _SUBMODULES:
        table.setdefault(sub, f"{__name__}.{sub}")
    return table


# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = _lazy_table()

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
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module == f"{__name__}.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
