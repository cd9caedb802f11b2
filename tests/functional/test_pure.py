"""``lightning_spectral.functional`` is pure: no Lightning, no ``nn.Module`` defined there."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from torch import nn

import lightning_spectral.functional as LF


def test_functional_defines_no_module():
    for info in pkgutil.iter_modules(LF.__path__):
        module = importlib.import_module(f"{LF.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                assert not issubclass(obj, nn.Module), f"{module.__name__}.{name}"
