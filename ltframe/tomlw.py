"""A small TOML writer for resolved recipes (stdlib tomllib only reads)."""

from __future__ import annotations

import json
import math
from typing import Any


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, dict):
        inner = ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None)
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def dumps(data: dict[str, Any]) -> str:
    """Top-level scalars first, then [tables] and [[arrays of tables]]; deeper dicts inline."""
    lines: list[str] = []
    tables, arrays = [], []
    for k, v in data.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in tables:
        lines += ["", f"[{_key(k)}]"]
        lines += [f"{_key(a)} = {_value(b)}" for a, b in v.items() if b is not None]
    for k, items in arrays:
        for item in items:
            lines += ["", f"[[{_key(k)}]]"]
            lines += [f"{_key(a)} = {_value(b)}" for a, b in item.items() if b is not None]
    return "\n".join(lines).lstrip("\n") + "\n"
