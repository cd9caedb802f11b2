"""The ``Examples:`` sections of ``lightning_spectral.functional`` run as doctests.

Every function and class listed in the ``__all__`` of a public functional submodule carries a
Google-style ``Examples:`` section with ``>>>`` lines (the API reference renders it as a code
block), and every ``>>>`` example found in those submodules — module docstring, public and
private objects, methods — must reproduce its printed output. Submodules are discovered, so a
new one is checked without an edit here.

The examples run in this process (no ``--doctest-modules``: that would also collect the test
files and could not check that every public name has an example), each in a fresh copy of its
module's namespace and with torch's global RNG state restored afterwards, so an example that
builds an ``nn.Module`` (default initialisation draws from the global RNG) never changes what
the tests after it see.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import pkgutil
import re
from types import ModuleType

import pytest
import torch

import lightning_spectral.functional as F

#: the section title the Google parser of the API reference renders as example code blocks
#: (``Example:`` would be rendered as an admonition of plain text, ``>>>`` read as quotes)
_SECTION = re.compile(r"^Examples:$", re.MULTILINE)


def _submodules() -> list[ModuleType]:
    names = sorted(m.name for m in pkgutil.iter_modules(F.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"{F.__name__}.{name}") for name in names]


def _public_objects() -> list[tuple[str, object]]:
    """``(module.name, object)`` for each function and class in a submodule's ``__all__``."""
    out: list[tuple[str, object]] = []
    for module in _submodules():
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((f"{module.__name__.rsplit('.', 1)[-1]}.{name}", obj))
    return out


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests: list[doctest.DocTest] = []
    for module in _submodules():
        tests.extend(t for t in finder.find(module) if t.examples)
    return sorted(tests, key=lambda t: t.name)


_TESTS = _doctests()
_PUBLIC = _public_objects()


@pytest.mark.parametrize(
    "test", _TESTS, ids=[t.name.removeprefix(f"{F.__name__}.") for t in _TESTS]
)
def test_example_runs(test: doctest.DocTest, one_thread: None) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    with torch.random.fork_rng(devices=[]):
        result = runner.run(test, out=report.write)
    assert result.failed == 0, report.getvalue()


@pytest.mark.parametrize("obj", [o for _, o in _PUBLIC], ids=[n for n, _ in _PUBLIC])
def test_public_name_has_example(obj: object) -> None:
    name = getattr(obj, "__qualname__", repr(obj))
    doc = inspect.getdoc(obj) or ""
    section = _SECTION.search(doc)
    assert section, f"{name} has no 'Examples:' section in its docstring"
    assert doctest.DocTestParser().get_examples(doc[section.end():]), (
        f"the 'Examples:' section of {name} has no '>>>' example"
    )


def test_examples_were_found() -> None:
    """The finder sees the examples (a broken collection would pass vacuously)."""
    assert _TESTS and _PUBLIC
