"""Write the API reference pages docs/api/*.md from the package's public names.

Walks ``lightning_spectral.__all__`` and the ``__all__`` of every public submodule of
``lightning_spectral.functional`` (whose union ``lightning_spectral.functional.__all__`` must
equal; tests/test_public_api.py checks that), and writes one mkdocstrings entry
(``::: path.to.Object``) per public object, rendered from its docstring by ``mkdocs build``.
It also keeps the "API reference" part of mkdocs.yml's ``nav`` in step (between the
``# api-nav`` marker comments).

    python scripts/gen_api_docs.py           # rewrite docs/api/ and the nav
    python scripts/gen_api_docs.py --check   # exit 1 (and say what) when they are out of date
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
MKDOCS = ROOT / "mkdocs.yml"
PACKAGE = "lightning_spectral"
NAV_BEGIN = "# api-nav: written by scripts/gen_api_docs.py"
NAV_END = "# end api-nav"
HEADER = "<!-- written by scripts/gen_api_docs.py from __all__: edit the docstrings, not this -->"

#: pages of the package root's names, by the module that defines them (first match wins)
ROOT_PAGES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    # (file, title, introduction, module prefixes)
    ("callbacks.md", "Callbacks",
     "The Lightning callbacks: add them to a `Trainer`'s `callbacks=[...]`.",
     (f"{PACKAGE}.callbacks.",)),
    ("checkpoints.md", "Checkpoints and compression",
     "Spectral analysis and truncated-SVD compression of trained weights, without a "
     "`Trainer`.",
     (f"{PACKAGE}.analysis", f"{PACKAGE}.compression")),
    ("errors.md", "Errors and warnings",
     "Every error the library raises on purpose derives from `SpectralError`.",
     (f"{PACKAGE}.errors",)),
)


@dataclass(frozen=True)
class Entry:
    """One public name: where it is imported from and where mkdocstrings finds it."""

    name: str  # the public name
    exported_from: str  # the module whose __all__ lists it
    path: str  # the dotted path mkdocstrings renders (the defining module's)
    obj: Any
    page: str  # docs/api/ relative page


def own_doc(obj: Any) -> str:
    """``obj``'s own docstring: not a base class's, not a dataclass's generated signature."""
    doc = obj.__doc__ if isinstance(obj, (type, ModuleType)) else inspect.getdoc(obj)
    if not isinstance(doc, str):
        return ""
    if isinstance(obj, type) and doc.startswith(f"{obj.__name__}("):  # dataclass default
        return ""
    return doc


def is_data(obj: Any) -> bool:
    """Constants and other values that have no docstring of their own."""
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj))


def canonical_path(obj: Any, exported_from: str, name: str) -> str:
    """Where the object is defined (``module.qualname``), else where it is exported from."""
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if (inspect.isclass(obj) or inspect.isroutine(obj)) and module and qual \
            and "<" not in qual and module.startswith(PACKAGE):
        return f"{module}.{qual}"
    return f"{exported_from}.{name}"


def functional_modules() -> list[str]:
    """The public submodules of ``lightning_spectral.functional`` (no leading underscore)."""
    functional = importlib.import_module(f"{PACKAGE}.functional")
    return sorted(m.name for m in pkgutil.iter_modules(functional.__path__)
                  if not m.name.startswith("_"))


def functional_entries() -> dict[str, list[Entry]]:
    """Per public functional submodule: its ``__all__`` names, in ``__all__`` order."""
    out: dict[str, list[Entry]] = {}
    for sub in functional_modules():
        modname = f"{PACKAGE}.functional.{sub}"
        module = importlib.import_module(modname)
        entries = []
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            entries.append(Entry(name, modname, canonical_path(obj, modname, name), obj,
                                 f"functional/{sub}.md"))
        out[sub] = entries
    return out


def root_entries(functional: dict[str, list[Entry]]) -> list[Entry]:
    """``lightning_spectral.__all__`` with each name's page."""
    package = importlib.import_module(PACKAGE)
    by_path = {e.path: e for entries in functional.values() for e in entries}
    out = []
    for name in package.__all__:
        obj = getattr(package, name)
        if inspect.ismodule(obj):
            sub = obj.__name__.removeprefix(f"{PACKAGE}.")
            page = "functional/index.md" if sub == "functional" else f"{sub}.md"
            out.append(Entry(name, PACKAGE, obj.__name__, obj, page))
            continue
        path = canonical_path(obj, PACKAGE, name)
        if path in by_path:  # rendered on its functional page
            out.append(Entry(name, PACKAGE, path, obj, by_path[path].page))
            continue
        module = path.rsplit(".", 1)[0] if not is_data(obj) else PACKAGE
        page = "index.md"
        if not is_data(obj):
            page = next((f for f, _, _, prefixes in ROOT_PAGES
                         if any(module.startswith(p) for p in prefixes)),
                        f"{module.removeprefix(PACKAGE + '.').replace('.', '_')}.md")
        out.append(Entry(name, PACKAGE, path, obj, page))
    return out


def module_block(path: str, heading_level: int = 1, members: bool = True) -> str:
    """A module page: its docstring, then (``members``) every name of its ``__all__``."""
    body = [HEADER, "", f"::: {path}", "    options:", f"      heading_level: {heading_level}",
            "      show_root_full_path: true"]
    body += ["      filters: public", "      show_submodules: false"] if members \
        else ["      members: false"]
    return "\n".join(body) + "\n"


def page_title(page: str) -> str:
    titles = {f: t for f, t, _, _ in ROOT_PAGES}
    if page in titles:
        return titles[page]
    return f"{PACKAGE}." + page.removesuffix(".md").removesuffix("/index").replace("/", ".")


def _entry_block(entry: Entry, heading_level: int = 2) -> str:
    return f"::: {entry.path}\n    options:\n      heading_level: {heading_level}\n"


def _link(entry: Entry, text: str | None = None) -> str:
    return f"[`{text or entry.name}`][{entry.path}]"


def pages() -> dict[str, str]:
    """docs/api/ relative path -> page text."""
    functional = functional_entries()
    root = root_entries(functional)
    out: dict[str, str] = {}

    # the package root's pages
    for file, title, intro, _ in ROOT_PAGES:
        mine = [e for e in root if e.page == file]
        if not mine:
            continue
        body = [HEADER, "", f"# {title}", "", intro, ""]
        body += ["Import them from the package root: "
                 f"`from {PACKAGE} import {', '.join(e.name for e in mine)}`.", ""]
        body += [_entry_block(e) for e in mine]
        out[file] = "\n".join(body)
    for e in root:  # root names of a module no ROOT_PAGES row claims
        if e.page not in out and e.page != "index.md" and not e.page.startswith("functional/") \
                and not inspect.ismodule(e.obj):
            others = [x for x in root if x.page == e.page]
            out[e.page] = "\n".join([HEADER, "", f"# `{e.path.rsplit('.', 1)[0]}`", ""]
                                    + [_entry_block(x) for x in others])
    for e in root:  # modules the root exposes (other than functional): the whole module
        if inspect.ismodule(e.obj) and e.name != "functional":
            out[e.page] = module_block(e.path, heading_level=1)

    # the index of everything: names only, so a docstring edit never makes it stale
    lines = [HEADER, "", "# API reference", "",
             f"Every public name of `{PACKAGE}` and `{PACKAGE}.functional`, rendered from its "
             "docstring. The package root imports lazily: `import lightning_spectral` does not "
             "import Lightning until a callback is used, and `lightning_spectral.functional` "
             "never does.", "",
             f"## `{PACKAGE}`", "", "| name | page |", "|---|---|"]
    for e in root:
        page = "functional/index.md" if e.name == "functional" else e.page
        title = page_title(page)
        if is_data(e.obj):
            lines.append(f"| `{e.name}` | the installed version, a string |")
        elif inspect.ismodule(e.obj):
            lines.append(f"| [`{e.name}`]({page}) | [{title}]({page}) |")
        else:
            lines.append(f"| {_link(e)} | [{title}]({page}) |")
    lines += ["", f"## `{PACKAGE}.functional`", "",
              f"Pure torch functions (`import {PACKAGE}.functional as F`; every module's names "
              f"are also `F.<name>`), one page per module: "
              + ", ".join(f"[`{sub}`](functional/{sub}.md)" for sub in functional) + "."]
    out["index.md"] = "\n".join(lines) + "\n"

    # functional: an overview and one page per submodule, each rendering the submodule's
    # __all__ (mkdocstrings' "public" filter), so a name added to a submodule needs no edit here
    out["functional/index.md"] = "\n".join(
        [module_block(f"{PACKAGE}.functional", heading_level=1, members=False), "",
         "| module | |", "|---|---|"]
        + [f"| [`{sub}`]({sub}.md) | `{PACKAGE}.functional.{sub}` |" for sub in functional])
    for sub in functional:
        out[f"functional/{sub}.md"] = module_block(f"{PACKAGE}.functional.{sub}",
                                                   heading_level=1)
    return {k: v.rstrip("\n") + "\n" for k, v in out.items()}


def nav(pages_: dict[str, str]) -> str:
    """The nav block of the API reference for mkdocs.yml (between the marker comments)."""
    titles = {"index.md": "Overview"} | {f: t for f, t, _, _ in ROOT_PAGES}
    lines = [f"  {NAV_BEGIN}", "  - API reference:"]
    top = [p for p in pages_ if "/" not in p]
    top.sort(key=lambda p: (p != "index.md", [f for f, *_ in ROOT_PAGES].index(p)
                            if p in titles and p != "index.md" else 99, p))
    for p in top:
        title = titles.get(p, f"{PACKAGE}.{p.removesuffix('.md')}")
        lines.append(f"      - {title}: api/{p}")
    lines.append("      - functional:")
    lines.append("          - Overview: api/functional/index.md")
    subpages = (p for p in pages_ if p.startswith("functional/") and p != "functional/index.md")
    for p in sorted(subpages):
        lines.append(f"          - {p.removeprefix('functional/').removesuffix('.md')}: api/{p}")
    lines.append(f"  {NAV_END}")
    return "\n".join(lines)


def documented_paths() -> set[str]:
    """The dotted paths the API reference renders (what cross-references may point at)."""
    functional = functional_entries()
    out = {e.path for entries in functional.values() for e in entries}
    for e in root_entries(functional):
        if not is_data(e.obj):
            out.add(e.path)
    out |= {f"{PACKAGE}.functional.{sub}" for sub in functional}
    return out


def rendered_paths(api: Path = API) -> tuple[set[str], set[str]]:
    """What docs/api/ renders: the ``::: path`` entries, and the modules among them rendered
    with ``filters: public`` (which show every name of the module's ``__all__``)."""
    paths: set[str] = set()
    public: set[str] = set()
    if not api.exists():
        return paths, public
    for page in api.rglob("*.md"):
        current = None
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("::: "):
                current = line[4:].strip()
                paths.add(current)
            elif current and line.strip() == "filters: public":
                public.add(current)
            elif not line.startswith(" "):
                current = None
    return paths, public


def _with_nav(text: str, block: str) -> str:
    pattern = re.compile(rf"^ *{re.escape(NAV_BEGIN)}\n.*?^ *{re.escape(NAV_END)}$",
                         re.MULTILINE | re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"mkdocs.yml: no '{NAV_BEGIN}' ... '{NAV_END}' block in nav")
    return pattern.sub(lambda _: block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/api/ or the nav is out of date; write nothing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    wanted = pages()
    mkdocs_text = MKDOCS.read_text(encoding="utf-8")
    new_mkdocs = _with_nav(mkdocs_text, nav(wanted))
    present = {p.relative_to(API).as_posix() for p in API.rglob("*.md")} if API.exists() else set()
    stale = sorted(p for p in wanted if not (API / p).exists()
                   or (API / p).read_text(encoding="utf-8") != wanted[p])
    extra = sorted(present - set(wanted))
    if args.check:
        problems = [f"docs/api/{p}: out of date" for p in stale]
        problems += [f"docs/api/{p}: no public name left on it" for p in extra]
        if new_mkdocs != mkdocs_text:
            problems.append("mkdocs.yml: the API reference nav is out of date")
        for line in problems:
            print(line)
        if problems:
            print("run: python scripts/gen_api_docs.py")
        return 1 if problems else 0
    for p in stale:
        (API / p).parent.mkdir(parents=True, exist_ok=True)
        (API / p).write_text(wanted[p], encoding="utf-8")
    for p in extra:
        (API / p).unlink()
    if new_mkdocs != mkdocs_text:
        MKDOCS.write_text(new_mkdocs, encoding="utf-8")
    print(f"docs/api: {len(wanted)} pages ({len(stale)} written, {len(extra)} removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
