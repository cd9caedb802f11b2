"""MkDocs hooks for the documentation site (loaded by mkdocs.yml's ``hooks:``).

The guides are also read on GitHub, where a link such as ``../benchmarks/RESULTS.md`` opens
the repository file. The site has no copy of files outside ``docs/``, so such a link would be
a dead link there (and a warning that ``mkdocs build --strict`` turns into an error). This
hook turns each link that leaves ``docs/`` and names an existing repository file into its
text, and logs it at INFO level. Links to files that do not exist anywhere are left alone, so
they still fail the strict build.

Docstrings point to the definitions as ``docs/definitions.md#<anchor>`` (readable in a terminal,
in an editor and on GitHub). On the site, :func:`on_page_content` turns each such reference
into a link to that section of the Definitions page; an anchor the page does not define is a
warning (an error under ``--strict``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.repository_links")

# [text](target) that is not an image; the target has no scheme and no leading slash
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>(?![a-z][a-z0-9+.-]*:|/|#)"
                   r"[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
_FENCE = re.compile(r"^(```|~~~)")


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    here = (docs / page.file.src_uri).parent

    def replace(match: re.Match[str]) -> str:
        target = (here / match.group("target")).resolve()
        if target.is_relative_to(docs) or not target.is_relative_to(repo) \
                or not target.exists():
            return match.group(0)
        log.info("%s: link to the repository file %s kept as text (not part of the site)",
                 page.file.src_uri, target.relative_to(repo).as_posix())
        return match.group("text")

    out, fenced = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        out.append(line if fenced else _LINK.sub(replace, line))
    return "\n".join(out)


# docs/definitions.md#anchor, as written in docstrings (rendered as text or inside <code>)
_DEFINITION_REF = re.compile(r"(?<![\w/.])(<code>)?docs/definitions\.md#([A-Za-z0-9_-]+)(</code>)?")
_ANCHOR = re.compile(r'<a id="([^"]+)"></a>|\{#([A-Za-z0-9_-]+)\}')
_anchors_cache: dict[str, set[str]] = {}


def _definition_anchors(config: Any) -> set[str]:
    path = Path(config["docs_dir"]) / "definitions.md"
    key = str(path.resolve())
    if key not in _anchors_cache:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        _anchors_cache[key] = {a or b for a, b in _ANCHOR.findall(text)}
    return _anchors_cache[key]


def on_page_content(html: str, *, page: Any, config: Any, files: Any) -> str:
    anchors = _definition_anchors(config)
    up = "../" * page.file.url.count("/")

    def link(match: re.Match[str]) -> str:
        anchor = match.group(2)
        if anchor not in anchors:
            log.warning("%s: docs/definitions.md#%s names no section of the Definitions page",
                        page.file.src_uri, anchor)
            return match.group(0)
        return f'<a href="{up}definitions.html#{anchor}">{match.group(0)}</a>'

    return _DEFINITION_REF.sub(link, html)
