"""What a component's parameters mean, for `ltframe components KIND NAME`.

A parameter's meaning is read at display time from its Params dataclass: the `# ...` comment
after the field (and comment lines right above it), or a `name: meaning` line of the class
docstring; its range comes from `ltframe.config.param` bounds.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import textwrap
import tokenize
import typing
from typing import Any

from ltframe.config import bounds_text, type_name
from ltframe.registry import Entry, Registry


def field_comments(cls: type) -> dict[str, str]:
    """{field: meaning} of a Params dataclass (its bases first; a subclass's text wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        out.update(_class_comments(klass))
    return out


def _class_comments(klass: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(klass))
        node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef))
        comments = {tok.start[0]: tok.string.lstrip("#").strip()
                    for tok in tokenize.generate_tokens(io.StringIO(src).readline)
                    if tok.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError, StopIteration):
        return {}
    lines = src.splitlines()
    own = set(klass.__dict__.get("__annotations__", {}))
    out: dict[str, str] = {}
    doc = ast.get_docstring(node) or ""
    for m in re.finditer(r"^\s*[-*]?\s*`?(\w+)`?\s*[:=]\s+(.+)$", doc, re.M):
        if m.group(1) in own:
            out[m.group(1)] = m.group(2).strip()
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        row = stmt.lineno - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments.get(row, ""))
            row -= 1
        after = [comments[r] for r in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1)
                 if r in comments and not lines[r - 1].strip().startswith("#")]
        text = " ".join(t for t in above + after if t)
        if text:
            out[stmt.target.id] = text
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    """A JSON-able form of a default value (repr for anything else)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def params_doc(cls: type) -> list[dict[str, Any]]:
    """One row per parameter: name, type, default, range, meaning."""
    hints = typing.get_type_hints(cls)
    meaning = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        bounds = f.metadata.get("bounds") or {}
        rows.append({
            "name": f.name,
            "type": type_name(hints[f.name]),
            "required": default is dataclasses.MISSING,
            "default": None if default is dataclasses.MISSING else _plain(default),
            "range": bounds_text(bounds) if bounds else "",
            "help": meaning.get(f.name, ""),
        })
    return rows


def aliases(registry: Registry, entry: Entry) -> list[str]:
    """Other names that select `entry` in a recipe."""
    return [n for n in registry.names(entry.kind)
            if n != entry.name and registry.get(entry.kind, n).name == entry.name]


def describe(registry: Registry, entry: Entry) -> dict[str, Any]:
    """A component as plain data (`ltframe components --json`)."""
    doc = inspect.cleandoc(entry.factory.__doc__ or "")  # its own, not a base class's
    return {
        "kind": entry.kind,
        "name": entry.name,
        "aliases": aliases(registry, entry),
        "plugin": entry.plugin,
        "description": doc.split("\n\n")[0].replace("\n", " ").strip(),
        "params": params_doc(entry.params),
    }
