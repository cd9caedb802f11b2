"""A Griffe extension for the docs build: Sphinx roles in docstrings become Markdown.

The package's docstrings are Google style ("Args:") but some still use Sphinx roles such as
``:class:`SpectralMonitor``` or ``:func:`~lightning_spectral.functional.spectrum.vne```, which
mkdocstrings does not understand. Before the docstrings are parsed, this extension rewrites
each role to

- a cross-reference ``[`vne`][lightning_spectral.functional.spectrum.vne]`` when its target
  resolves (in the docstring's scope, or as a dotted path) to an object that the API
  reference renders (a ``::: path`` entry in docs/api/, or a documented public member of
  one), so the link always exists and ``mkdocs build --strict`` stays quiet;
- inline code (`` `vne` ``) otherwise.

``~`` keeps only the last component as the text, as in Sphinx; ``text <target>`` is honoured.
Loaded by mkdocs.yml (``extensions: [scripts/griffe_sphinx_roles.py]``).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`(?P<body>[^`]+)`")


def _gen_api_docs() -> Any:
    """scripts/gen_api_docs.py (beside this file), which knows what docs/api/ renders."""
    key = "_ls_scripts_gen_api_docs"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            key, Path(__file__).resolve().parent / "gen_api_docs.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]



class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.rendered, self.public_modules = _gen_api_docs().rendered_paths()
        self.converted = 0
        self.linked = 0

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: Any, seen: set[int]) -> None:
        if id(obj) in seen or obj.is_alias:
            return
        seen.add(id(obj))
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(lambda m: self._replace(obj, m), obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)

    def _replace(self, obj: Any, match: re.Match[str]) -> str:
        body = match.group("body").strip()
        explicit = re.fullmatch(r"(?P<text>.*?)\s*<(?P<target>[^>]+)>", body)
        if explicit:
            text, target = explicit.group("text"), explicit.group("target")
        else:
            target = body.lstrip("~")
            text = target.rsplit(".", 1)[-1] if body.startswith("~") else target
        target = target.lstrip("~").rstrip("()")
        if match.group("role") in ("func", "meth") and not text.endswith(")"):
            text += "()"
        self.converted += 1
        path = self._resolve(obj, target)
        if path is None:
            return f"`{text}`"
        self.linked += 1
        return f"[`{text}`][{path}]"

    def _resolve(self, obj: Any, target: str) -> str | None:
        """The rendered path ``target`` names from ``obj``'s scope, or None."""
        candidates = []
        scope = obj if obj.is_module or obj.is_class else obj.parent
        while scope is not None:
            candidates.append(f"{scope.path}.{target}")
            scope = scope.parent
        candidates.append(target)
        first = target.split(".", 1)[0]
        try:  # a name imported into the docstring's module
            imported = obj.module.members.get(first) if obj.module else None
            if imported is not None and imported.is_alias:
                rest = target[len(first):]
                candidates.insert(0, imported.target_path + rest)
        except Exception:  # noqa: BLE001 - an unresolvable alias is simply not a link
            pass
        for candidate in candidates:
            path = self._final(obj, candidate)
            if path is not None and self._is_rendered(obj, path):
                return path
        # a public name re-exported lazily (e.g. lightning_spectral.functional.vne): a unique
        # rendered object of that name under the named package
        prefix, _, name = target.rpartition(".")
        matches = {p for p in self._all_rendered(obj)
                   if p.rsplit(".", 1)[-1] == name and p.startswith(prefix)}
        return matches.pop() if len(matches) == 1 else None

    def _all_rendered(self, obj: Any) -> set[str]:
        """Every rendered path, with the ``__all__`` of the public-filtered modules."""
        if not hasattr(self, "_expanded"):
            expanded = set(self.rendered)
            for module in self.public_modules:
                try:
                    exports = obj.modules_collection.get_member(module).exports or ()
                except Exception:  # noqa: BLE001 - a module griffe did not load
                    continue
                expanded |= {f"{module}.{name}" for name in map(str, exports)}
            self._expanded = expanded
        return self._expanded

    @staticmethod
    def _final(obj: Any, path: str) -> str | None:
        try:
            found = obj.modules_collection.get_member(path)
        except Exception:  # noqa: BLE001 - not an object griffe knows
            return None
        try:
            return found.final_target.path if found.is_alias else found.path
        except Exception:  # noqa: BLE001 - an alias to something outside the package
            return None

    def _is_rendered(self, obj: Any, path: str) -> bool:
        rendered = self._all_rendered(obj)
        if path in rendered:
            return True
        parent, _, name = path.rpartition(".")
        if parent not in rendered or name.startswith("_"):
            return False
        try:  # a documented public member of a rendered class
            member = obj.modules_collection.get_member(path)
        except Exception:  # noqa: BLE001
            return False
        return not member.is_alias and member.docstring is not None and (
            member.parent is not None and member.parent.is_class)
