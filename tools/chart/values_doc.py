"""Reads the comments of helm/afnext/values.yaml: the comment block right above each key (or at the end of its
line) documents it. Used by gen_schema.py (schema descriptions) and check.py (every key documented)."""

from __future__ import annotations

import re
from pathlib import Path

KEY = re.compile(r'^(?P<indent> *)(?:- )?(?P<key>"[^"]+"|[A-Za-z0-9_./-]+):(?:\s|$)')


def key_docs(path: Path) -> dict[tuple[str, ...], str]:
    """Maps each key's path (a tuple of names) to its comment ("" when it has none).

    Only block-style mappings are followed (what values.yaml uses); keys inside list items are not keys of
    the values tree and are skipped.
    """
    docs: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    pending: list[str] = []
    pending_indent = -1
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not stripped:
            pending, pending_indent = [], -1
            continue
        if stripped.startswith("#"):
            indent = len(raw) - len(raw.lstrip(" "))
            if pending and indent != pending_indent:
                pending = []
            pending.append(stripped.lstrip("#").strip())
            pending_indent = indent
            continue
        m = KEY.match(raw)
        if not m or stripped.startswith("- "):
            pending, pending_indent = [], -1
            continue
        indent = len(m.group("indent"))
        key = m.group("key").strip('"')
        while stack and stack[-1][0] >= indent:
            stack.pop()
        trailing = ""
        rest = raw[m.end():]
        if " #" in rest or rest.lstrip().startswith("#"):
            trailing = rest.split("#", 1)[1].strip()
        doc = " ".join(pending) if pending and pending_indent == indent else ""
        docs[tuple(k for _, k in stack) + (key,)] = (doc + " " + trailing).strip()
        stack.append((indent, key))
        pending, pending_indent = [], -1
    return docs
