"""MkDocs hook: links from the docs to the repository's own files (../BENCHMARKS.md, ../experiments/...) work
in the site.

The guides live in docs/, but they point at files that belong beside the code (BENCHMARKS.md, each
experiment's README.md and plots, source files). MkDocs only knows docs/, so such a link would be a broken-link
warning under `mkdocs build --strict`. This hook adds every repository file that a page links to (and, for
Markdown files, what those link to in turn) under `repo/<path>` in the site, and rewrites the links of every
page to where the target ended up. A link in a docs page to a path that does not exist stays as written, so
MkDocs reports it (and `--strict` fails). In a repository file shown this way, a link to a file that is not in
the repository (the report of a run still going, say) becomes its text and path, logged at INFO: the strict
check holds the guides, not every README of the experiments.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re

from mkdocs.structure.files import File, InclusionLevel

PREFIX = "repo/"
LINK = re.compile(r"(!?\[([^\]]*)\]\()([^)\s]+)(\))")  # [text](target) and ![alt](image)
log = logging.getLogger("mkdocs.hooks.repo_files")
# fenced code is left alone: a `](...)` inside an example is not a link
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def _root(config) -> str:
    return os.path.dirname(os.path.abspath(config.config_file_path))


def _docs_rel(config) -> str:
    return os.path.relpath(config.docs_dir, _root(config)).replace(os.sep, "/")


def _real(src_uri: str, docs: str) -> str:
    """A site file's path relative to the repository root."""
    return src_uri[len(PREFIX):] if src_uri.startswith(PREFIX) else posixpath.join(docs, src_uri)


def _targets(markdown: str):
    text = FENCE.sub("", markdown)
    for m in LINK.finditer(text):
        target = m.group(3)
        if "://" in target or target.startswith(("#", "mailto:", "/")):
            continue
        yield target.split("#", 1)[0]


def on_files(files, config):
    root, docs = _root(config), _docs_rel(config)
    queue = [f for f in files if f.src_uri.endswith(".md")]
    seen = {f.src_uri for f in files}
    while queue:
        page = queue.pop()
        with open(page.abs_src_path, encoding="utf-8") as fh:
            markdown = fh.read()
        base = posixpath.dirname(_real(page.src_uri, docs))
        for path in _targets(markdown):
            real = posixpath.normpath(posixpath.join(base, path))
            if real.startswith("..") or real == docs or real.startswith(docs + "/"):
                continue  # outside the repository, or a docs page MkDocs already has
            src = PREFIX + real
            abs_path = os.path.join(root, real)
            if src in seen or not os.path.isfile(abs_path):
                continue
            # not in the nav and not reported as such: reachable through the links that named it
            f = File.generated(config, src, abs_src_path=abs_path, inclusion=InclusionLevel.NOT_IN_NAV)
            files.append(f)
            seen.add(src)
            if src.endswith(".md"):
                queue.append(f)
    return files


def on_page_markdown(markdown, page, config, files):
    root, docs = _root(config), _docs_rel(config)
    here = page.file.src_uri
    base = posixpath.dirname(_real(here, docs))

    def rewrite(m):
        target = m.group(3)
        if "://" in target or target.startswith(("#", "mailto:", "/")):
            return m.group(0)
        path, _, anchor = target.partition("#")
        real = posixpath.normpath(posixpath.join(base, path))
        if real == docs or real.startswith(docs + "/"):
            src = real[len(docs) + 1:]
        else:
            src = PREFIX + real
        if files.get_file_from_path(src) is None:
            if here.startswith(PREFIX) and not os.path.exists(os.path.join(root, real)):
                log.info("%s links to %s, which is not in the repository: shown as text", here, real)
                return f"{m.group(2)} (`{path}`, not in the repository)"
            return m.group(0)
        new = posixpath.relpath(src, posixpath.dirname(here) or ".")
        return m.group(1) + new + ("#" + anchor if anchor else "") + m.group(4)

    # rewrite outside fenced code only
    out, last = [], 0
    for fence in FENCE.finditer(markdown):
        out.append(LINK.sub(rewrite, markdown[last:fence.start()]))
        out.append(fence.group(0))
        last = fence.end()
    out.append(LINK.sub(rewrite, markdown[last:]))
    return "".join(out)
