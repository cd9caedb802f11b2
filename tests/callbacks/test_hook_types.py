"""Every Lightning hook a callback defines is marked ``@override`` and typed with Lightning's
classes, so a renamed or re-signed hook upstream is a type error instead of a hook that is
silently never called."""

from __future__ import annotations

import inspect
import typing

import pytest

import lightning_spectral as ls
from lightning_spectral._compat import Callback

CALLBACKS = [
    ls.SpectralMonitor,
    ls.CollapseMonitor,
    ls.VNEPenalty,
    ls.CurvatureMonitor,
    ls.SpectralAlarm,
    ls.MirrorCertificate,
]

HOOKS = sorted(n for n in dir(Callback) if not n.startswith("_"))


def _overridden(cls: type) -> list[tuple[str, object]]:
    out = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("lightning_spectral"):
            for name, value in vars(klass).items():
                if name in HOOKS:
                    out.append((f"{klass.__qualname__}.{name}", value))
    return out


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_hooks_are_marked_override(cls: type) -> None:
    hooks = _overridden(cls)
    assert hooks, f"{cls.__name__} defines no Lightning hook"
    missing = []
    for qualname, value in hooks:
        fn = value.fget if isinstance(value, property) else value
        if not getattr(fn, "__override__", False):
            missing.append(qualname)
    assert not missing, f"hooks without @override: {missing}"


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_hook_arguments_use_lightning_types(cls: type) -> None:
    untyped = []
    for qualname, value in _overridden(cls):
        if isinstance(value, property) or not callable(value):
            continue
        params = inspect.signature(value).parameters
        hints = typing.get_type_hints(value, globalns=vars(inspect.getmodule(value)))
        for arg, wanted in (("trainer", "Trainer"), ("pl_module", "LightningModule")):
            if arg in params and getattr(hints.get(arg), "__name__", None) != wanted:
                untyped.append(f"{qualname}({arg}: {hints.get(arg)!r})")
    assert not untyped, f"hook arguments not typed with Lightning's classes: {untyped}"
