"""MkDocs hooks for the documentation site (loaded by mkdocs.yml's ``hooks:``).

The guides are also read on GitHub, where a link such as ``../benchmarks/RESULTS.md`` opens
the repository file. The site has no copy of files outside ``docs/``, so such a link would be
a dead link there (and a warning that ``mkdocs build --strict`` turns into an error). This
hook turns each link that leaves ``docs/`` and names an existing repository file into its
text, and logs it at INFO level. Links to files that do not exist anywhere are left alone, so
they still fail the strict build.
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
