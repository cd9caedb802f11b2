"""The package root and ``functional`` resolve every advertised name; the CLI starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lightning_spectral
import lightning_spectral.functional as F


@pytest.mark.parametrize("name", lightning_spectral.__all__)
def test_root_names_resolve(name: str) -> None:
    assert getattr(lightning_spectral, name) is not None


@pytest.mark.parametrize("name", F.__all__)
def test_functional_names_resolve(name: str) -> None:
    assert callable(getattr(F, name))


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        lightning_spectral.no_such_thing  # noqa: B018


def test_cli_version_and_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lightning_spectral", "--version"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert lightning_spectral.__version__ in out
    helptext = subprocess.run(
        [sys.executable, "-m", "lightning_spectral", "--help"],
        capture_output=True, text=True, check=True,
    ).stdout
    for sub in ("check", "analyze", "align"):
        assert sub in helptext


def test_functional_import_does_not_import_lightning() -> None:
    code = (
        "import sys, lightning_spectral.functional as F; F.vne; F.neural_collapse; "
        "bad = [m for m in ('lightning', 'pytorch_lightning') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
