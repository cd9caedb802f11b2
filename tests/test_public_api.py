"""The public API: every advertised name resolves, is documented, and nothing drifts.

``lightning_spectral.__all__`` and ``lightning_spectral.functional.__all__`` are what users
import; the modules' own ``__all__`` lists are where the names are defined. These tests fail
when the two disagree (a name added to a module but not exported, or exported but gone), when a
public name has no docstring, or when the API reference (docs/api/, written by
scripts/gen_api_docs.py) is out of date. The CLI starts.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import lightning_spectral
import lightning_spectral.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (registered, so its dataclasses work)."""
    key = f"_ls_scripts_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def _functional_submodules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(F.__path__) if not m.name.startswith("_"))


def _functional_sources() -> dict[str, str]:
    """Public name -> functional submodule whose ``__all__`` lists it."""
    out: dict[str, str] = {}
    for sub in _functional_submodules():
        module = importlib.import_module(f"{F.__name__}.{sub}")
        assert hasattr(module, "__all__"), f"lightning_spectral.functional.{sub} has no __all__"
        for name in module.__all__:
            assert name not in out or getattr(module, name) is getattr(
                importlib.import_module(f"{F.__name__}.{out[name]}"), name
            ), f"functional.{sub} and functional.{out[name]} both export a different {name!r}"
            out.setdefault(name, sub)
    return out


# --- everything advertised resolves -------------------------------------------------------


@pytest.mark.parametrize("name", lightning_spectral.__all__)
def test_root_names_resolve(name: str) -> None:
    assert getattr(lightning_spectral, name) is not None


@pytest.mark.parametrize("name", F.__all__)
def test_functional_names_resolve(name: str) -> None:
    assert getattr(F, name) is not None


def test_star_import_gives_all() -> None:
    namespace: dict[str, object] = {}
    exec("from lightning_spectral import *", namespace)  # noqa: S102 - the import under test
    assert set(lightning_spectral.__all__) <= set(namespace)


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        lightning_spectral.no_such_thing  # noqa: B018


def test_root_dir_lists_every_public_name() -> None:
    assert set(lightning_spectral.__all__) <= set(dir(lightning_spectral))


# --- no drift between the export tables and the modules' __all__ --------------------------


def test_functional_all_is_the_union_of_its_modules() -> None:
    """``functional.__all__`` is exactly what its public submodules export."""
    sources = _functional_sources()
    missing = sorted(set(sources) - set(F.__all__))
    unknown = sorted(set(F.__all__) - set(sources))
    assert not missing, (
        f"lightning_spectral.functional.__all__ lacks names its modules export: "
        f"{', '.join(f'{n} ({sources[n]})' for n in missing)}"
    )
    assert not unknown, f"lightning_spectral.functional.__all__ names no module exports: {unknown}"


@pytest.mark.parametrize("name", sorted(_functional_sources()))
def test_functional_name_is_its_modules_object(name: str) -> None:
    sub = _functional_sources()[name]
    module = importlib.import_module(f"{F.__name__}.{sub}")
    assert getattr(F, name) is getattr(module, name), f"F.{name} is not F.{sub}.{name}"


@pytest.mark.parametrize("sub", _functional_submodules())
def test_functional_submodules_are_attributes(sub: str) -> None:
    assert getattr(F, sub) is importlib.import_module(f"{F.__name__}.{sub}")


@pytest.mark.parametrize("module, wanted", lightning_spectral._SOURCES)
def test_root_names_are_in_their_modules_all(module: str, wanted: object) -> None:
    """Each re-exported name is in its module's ``__all__``, read statically or not."""
    mod = importlib.import_module(module)
    static = lightning_spectral._static_all(module)
    assert static is not None, f"{module}: __all__ is not a literal list (the root reads it)"
    assert list(static) == list(mod.__all__), f"{module}: __all__ changes after its assignment"
    names = mod.__all__ if wanted == "*" else wanted
    for name in names:
        assert name in mod.__all__, f"{module}.__all__ lacks {name!r}, which the root exports"
        assert getattr(lightning_spectral, name) is getattr(mod, name)


def test_type_checking_imports_match_the_lazy_table() -> None:
    """What type checkers see (the ``if TYPE_CHECKING:`` imports) is what resolves at run time."""
    tree = ast.parse((ROOT / "lightning_spectral" / "__init__.py").read_text(encoding="utf-8"))
    seen: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                for alias in imp.names:
                    assert alias.asname == alias.name, f"{alias.name}: import it 'as {alias.name}'"
                    seen[alias.name] = f"{imp.module}.{alias.name}" \
                        if imp.module == "lightning_spectral" else str(imp.module)
    assert seen == lightning_spectral._LAZY


def test_static_all_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ls_probe_list.py").write_text(
        '"""doc"""\nimport os\n\n__all__ = [\n    "a",  # a comment ]\n    "b",\n]\nx = 1\n')
    (tmp_path / "ls_probe_ann.py").write_text('__all__: tuple[str, ...] = ("c",)\n')
    (tmp_path / "ls_probe_dynamic.py").write_text('_T = {"d": 1}\n__all__ = sorted(_T)\n')
    (tmp_path / "ls_probe_none.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    read = lightning_spectral._static_all
    assert read("ls_probe_list") == ("a", "b")
    assert read("ls_probe_ann") == ("c",)
    assert read("ls_probe_dynamic") is None
    assert read("ls_probe_none") is None
    assert read("ls_probe_missing") is None
    assert lightning_spectral._module_all("ls_probe_dynamic") == ("d",)  # imported instead


# --- documented ---------------------------------------------------------------------------


def _public_objects() -> list[tuple[str, object]]:
    out = [(f"lightning_spectral.{n}", getattr(lightning_spectral, n))
           for n in lightning_spectral.__all__]
    for name, sub in sorted(_functional_sources().items()):
        out.append((f"lightning_spectral.functional.{sub}.{name}",
                    getattr(importlib.import_module(f"{F.__name__}.{sub}"), name)))
    return out


@pytest.mark.parametrize("name, obj", _public_objects(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_public_names_have_docstrings(name: str, obj: object) -> None:
    gen = _load_script("gen_api_docs")
    if gen.is_data(obj):
        return
    assert gen.own_doc(obj).strip(), f"{name} has no docstring of its own"


def test_api_reference_is_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/api/ and mkdocs.yml's nav are what scripts/gen_api_docs.py writes."""
    gen = _load_script("gen_api_docs")
    code = gen.main(["--check"])
    assert code == 0, capsys.readouterr().out


def test_every_public_name_is_in_the_api_reference() -> None:
    gen = _load_script("gen_api_docs")
    rendered, public_modules = gen.rendered_paths(ROOT / "docs" / "api")
    for module in public_modules:  # these pages render the module's whole __all__
        rendered |= {f"{module}.{n}" for n in importlib.import_module(module).__all__}
    for name, obj in _public_objects():
        if gen.is_data(obj):
            continue
        exported_from, _, short = name.rpartition(".")
        path = obj.__name__ if inspect.ismodule(obj) else gen.canonical_path(
            obj, exported_from, short)
        assert path in rendered, f"{name} ({path}) is not rendered by any docs/api page"


def test_package_ships_py_typed() -> None:
    assert (Path(lightning_spectral.__file__).parent / "py.typed").is_file()


# --- imports stay lazy, the CLI starts ----------------------------------------------------


def test_root_import_is_light() -> None:
    code = (
        "import sys, lightning_spectral as ls; ls.__all__; dir(ls); "
        "bad = [m for m in ('torch', 'lightning', 'pytorch_lightning') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
