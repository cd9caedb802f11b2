"""What a plain ``pip install .`` user gets: the examples' declared needs, public imports only,
either Lightning flavour, optional features that name their package, and the ``py.typed``
marker in the built wheel.

The install itself (a new virtual environment, ``pip install .`` without extras, the examples
and the README's snippet run against it) is scripts/fresh_install.sh, run by .ci/run.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

import lightning_spectral

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _runner() -> ModuleType:
    key = "_ls_scripts_run_examples"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / "run_examples.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _imports(path: Path) -> list[tuple[str, list[str], ast.stmt]]:
    """``(module, imported names, node)`` of every import statement in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [alias.name for alias in node.names], node))
    return out


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        names.add(name.strip().lower().replace("_", "-"))
    return names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_declares_existing_extras(path: Path) -> None:
    example = _runner().parse(path)
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra in example.extras:
        assert extra in extras, f"{path.name}: '# requires: extra={extra}' is not in pyproject.toml"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_that_needs_scikit_learn_declares_it(path: Path) -> None:
    """The digits of ``lightning_spectral.demos`` come from scikit-learn, not a plain install."""
    uses_digits = any(module == "lightning_spectral.demos" for module, _, _ in _imports(path))
    if not uses_digits:
        return
    example = _runner().parse(path)
    extras = PYPROJECT["project"]["optional-dependencies"]
    provided = set().union(*(_requirement_names(extras[e]) for e in example.extras)) \
        if example.extras else set()
    assert "scikit-learn" in provided, (
        f"{path.name} uses lightning_spectral.demos (scikit-learn's digits): declare an extra "
        "that installs scikit-learn, e.g. '# requires: extra=dev'")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_uses_public_imports_only(path: Path) -> None:
    public_root = set(lightning_spectral.__all__)
    for module, names, node in _imports(path):
        if not module.startswith("lightning_spectral"):
            continue
        parts = module.split(".")
        assert not any(p.startswith("_") for p in parts), \
            f"{path.name}:{node.lineno}: imports the private module {module}"
        assert not any(n.startswith("_") for n in names), \
            f"{path.name}:{node.lineno}: imports a private name from {module}"
        if module == "lightning_spectral":
            unknown = [n for n in names if n not in public_root]
            assert not unknown, f"{path.name}:{node.lineno}: {unknown} not in __all__"
        elif not module.startswith("lightning_spectral.functional"):
            at_root = [n for n in names if n in public_root]
            assert not at_root, (f"{path.name}:{node.lineno}: import {at_root} from "
                                 "lightning_spectral (the public path), not from " + module)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_works_with_either_lightning_flavour(path: Path) -> None:
    """``lightning`` is imported only inside a ``try`` that falls back to pytorch_lightning."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded: set[tuple[int, int]] = set()  # (line, column) of guarded statements
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            fallback = any(
                isinstance(n, (ast.Import, ast.ImportFrom))
                and any("pytorch_lightning" in (a.name if isinstance(n, ast.Import)
                                                else (n.module or "")) for a in n.names)
                for h in node.handlers for n in ast.walk(h)
            )
            if fallback:
                guarded |= {(n.lineno, n.col_offset) for stmt in node.body
                            for n in ast.walk(stmt) if isinstance(n, ast.stmt)}
    for module, _, node in _imports(path):
        if module == "lightning" or module.startswith("lightning."):
            assert (node.lineno, node.col_offset) in guarded, (
                f"{path.name}:{node.lineno}: 'import {module}' without a pytorch_lightning "
                "fallback; a plain install has pytorch_lightning only")


def test_runner_lists_the_plain_install_examples() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_examples.py"), "--list",
                          "--no-extras"], capture_output=True, text=True, check=True).stdout
    assert "run  examples/mirror_1d.py" in out


def test_header_parsing(tmp_path: Path) -> None:
    example = tmp_path / "x.py"
    example.write_text('#!/usr/bin/env python\n# requires: extra=dev,docs  (why)\n'
                       '# smoke: --quick --name "a b"\n# smoke:\n"""doc"""\n# smoke: --late\n')
    parsed = _runner().parse(example)
    assert parsed.extras == ["dev", "docs"]
    assert parsed.runs == [["--quick", "--name", "a b"], []]


def test_optional_feature_names_its_package() -> None:
    """Without scikit-learn, ``align --data digits`` says so in one line and exits 2."""
    code = (
        "import sys, torch\n"
        "sys.modules['sklearn'] = None  # as if scikit-learn were not installed\n"
        "torch.save({'fc.weight': torch.zeros(10, 64)}, sys.argv[1] + '/a.pt')\n"
        "torch.save({'fc.weight': torch.ones(10, 64)}, sys.argv[1] + '/b.pt')\n"
        "from lightning_spectral.cli import main\n"
        "sys.exit(main(['align', sys.argv[1] + '/a.pt', sys.argv[1] + '/b.pt',"
        " '--data', 'digits']))\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "scikit-learn" in lines[0], proc.stderr


def test_py_typed_is_package_data() -> None:
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["lightning_spectral"]
    assert "py.typed" in data
    assert (ROOT / "lightning_spectral" / "py.typed").is_file()


@pytest.mark.slow
def test_wheel_ships_py_typed(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT / "lightning_spectral", src / "lightning_spectral",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("lightning_spectral-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_spectral/py.typed" in names


def test_ci_runs_the_fresh_install() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "make fresh-install" in ci or "scripts/fresh_install.sh" in ci
    assert "\tbash scripts/fresh_install.sh" in makefile
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "fresh_install.sh")], check=True)
