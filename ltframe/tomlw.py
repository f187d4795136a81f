"""TOML text of recipe dicts with the maintained `tomli-w` writer (the stdlib's tomllib only
reads). TOML has no null: keys whose value is None are left out (the recipe default applies)."""

from __future__ import annotations

from typing import Any

import tomli_w


def _drop_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list | tuple):
        return [_drop_none(x) for x in v]
    return v


def dumps(data: dict[str, Any]) -> str:
    """`data` as TOML: top-level values, then [tables] and [[arrays of tables]]."""
    return tomli_w.dumps(_drop_none(data))
