"""Typed conversion of plain TOML data into dataclasses, with precise error paths.

Every error names the TOML path, the expected type or allowed names and the closest match.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

from ltframe.errors import RecipeError, allowed, closest

_MISSING = dataclasses.MISSING


@dataclasses.dataclass
class ComponentSpec:
    """A recipe table that names a registered component: `name` plus its typed Params."""

    kind: str
    name: str
    params: Any
    weight: float = 1.0  # used by loss terms only
    start: int = 0  # loss terms only: the stage step from which the term counts (a warm-up)

    def to_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {"name": self.name}
        if self.kind == "loss":
            table["weight"] = self.weight
            if self.start:
                table["start"] = self.start
        if dataclasses.is_dataclass(self.params):
            table.update(to_plain(self.params))
        return table


ComponentResolver = Callable[[str, Any, str], ComponentSpec]

_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


#: the largest integer a recipe may hold (torch and numpy take signed 64-bit integers)
INT_LIMIT = 2**63 - 1
#: `param(ref=...)` kinds: a field naming a model head that gives class logits (as many
#: outputs as classes), any model head (e.g. a projection), or a stage input part
REFS = ("head", "any_head", "part")


def param(default: Any = _MISSING, *, factory: Callable[[], Any] | None = None,
          ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, finite: bool = True, ref: str | None = None) -> Any:
    """A dataclass field whose numeric value (or every number in a list value) must lie within
    the given bounds; checked when a recipe is read, reported with its TOML path.

    Usable in any plugin's Params: ``batch_size: int = param(128, ge=1)``. Every float field
    of a recipe rejects NaN and inf unless its field says ``finite=False``. ``ref="head"`` marks
    a string naming a head with one output per class, ``ref="any_head"`` any head (e.g. a
    projection), ``ref="part"`` a stage input part (e.g. "unlabeled:strong"; "" = not used);
    all are checked against the model and the stage's data and views before a run starts
    (fields named `head` and `part` are taken as such refs too).
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if ref is not None and ref not in REFS:
        raise ValueError(f"param(ref={ref!r}): use one of {REFS}")
    meta: dict[str, Any] = {"bounds": bounds, "finite": finite}
    if ref is not None:
        meta["ref"] = ref
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def bounds_text(bounds: dict[str, float]) -> str:
    return " and ".join(f"{_BOUNDS[k]} {_num(v)}" for k, v in bounds.items())


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def check_finite(value: Any, path: str, bounds: dict[str, float] | None = None) -> None:
    """Raise a RecipeError naming `path` when `value` (or a number nested in its lists and
    tables) is NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        rng = f" {bounds_text(bounds)}" if bounds else ""
        raise RecipeError(f"{path}: {value} is not allowed; give a finite number{rng}")
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            check_finite(v, _join(path, i), bounds)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, _join(path, str(k)), bounds)


def check_bounds(value: Any, bounds: dict[str, float], path: str) -> None:
    """Raise a RecipeError naming `path` when a number in `value` breaks `bounds`."""
    if not bounds or value is None:
        return
    items = value if isinstance(value, list | tuple) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if isinstance(v, float) and math.isnan(v):
            raise RecipeError(f"{path}: nan is out of range; it must be {bounds_text(bounds)}")
        ok = all({"ge": v >= b, "gt": v > b, "le": v <= b, "lt": v < b}[k]
                 for k, b in bounds.items())
        if not ok:
            raise RecipeError(f"{path}: {_num(v)} is out of range; it must be {bounds_text(bounds)}")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if tp is type(None):
        return "none"
    if tp is float:
        return "float"
    return getattr(tp, "__name__", str(tp))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def convert(
    tp: Any,
    value: Any,
    path: str,
    resolver: ComponentResolver | None = None,
    kind: str | None = None,
) -> Any:
    """Check `value` against type `tp` and return it converted (dataclasses built)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is ComponentSpec:
        if resolver is None or kind is None:
            raise TypeError(f"{path}: component field without a 'kind' in its metadata")
        return resolver(kind, value, path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path, resolver, kind)
            except RecipeError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"{path}: expected {type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise RecipeError(
                f"{path}: {_show(value)} is not allowed; allowed: "
                f"{', '.join(repr(c) for c in choices)}{closest(str(value), map(str, choices))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{path}: expected a list ({type_name(tp)}), got {_show(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise RecipeError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(
                convert(a, v, _join(path, i), resolver, kind)
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        out = [convert(item, v, _join(path, i), resolver, kind) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a table, got {_show(value)}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {
            str(k): convert(val_tp, v, _join(path, str(k)), resolver, kind)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, resolver)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{path}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{path}: expected an integer, got {_show(value)}")
        if abs(value) > INT_LIMIT:
            raise RecipeError(f"{path}: {value} does not fit a 64-bit integer; give a value "
                              f"between -{INT_LIMIT} and {INT_LIMIT}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(f"{path}: expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:
            raise RecipeError(f"{path}: {value} is too large for a float") from None
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{path}: expected a string, got {_show(value)}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise RecipeError(f"{path}: expected {type_name(tp)}, got {_show(value)}")
    return value


def from_dict(
    cls: type, data: Any, path: str = "", resolver: ComponentResolver | None = None
) -> Any:
    """Build dataclass `cls` from a TOML table, rejecting unknown keys and wrong types."""
    where = path or "the recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a table, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise RecipeError(
                f"{_join(path, key)}: unknown key; allowed keys: {allowed(fields)}"
                f"{closest(key, fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = convert(
                hints[name], data[name], _join(path, name), resolver, f.metadata.get("kind")
            )
            if f.metadata.get("finite", True):
                check_finite(kwargs[name], _join(path, name), f.metadata.get("bounds"))
            check_bounds(kwargs[name], f.metadata.get("bounds", {}), _join(path, name))
        elif f.metadata.get("kind") and resolver is not None:  # defaults given as names
            default = f.default_factory() if f.default_factory is not _MISSING else f.default
            kwargs[name] = convert(hints[name], default, _join(path, name), resolver,
                                   f.metadata["kind"])
        elif dataclasses.is_dataclass(hints[name]) and resolver is not None:  # nested defaults
            kwargs[name] = from_dict(hints[name], {}, _join(path, name), resolver)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise RecipeError(f"{_join(path, name)}: required key is missing ({type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: {exc}") from None


def refs(params: Any) -> list[tuple[str, str, str]]:
    """(field, "head" | "any_head" | "part", value) of each non-empty string field of a Params dataclass
    that names a model head or a stage input part (`param(ref=...)`, or a field named `head` /
    `part`)."""
    if not dataclasses.is_dataclass(params) or isinstance(params, type):
        return []
    out = []
    for f in dataclasses.fields(params):
        ref = f.metadata.get("ref") or (f.name if f.name in REFS else None)
        value = getattr(params, f.name)
        if ref and isinstance(value, str) and value:
            out.append((f.name, ref, value))
    return out


#: a plain name: becomes part of a file or folder name in the run directory
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def check_plain_name(name: Any, path: str, what: str = "a file name in the run directory") -> None:
    """`name` becomes part of a path: no separators, no '..', no leading '.', at most 100
    characters of letters, digits and '._+-'."""
    if not (isinstance(name, str) and PLAIN_NAME.fullmatch(name) and ".." not in name):
        raise RecipeError(f"{path}: {name!r} is not a plain name; use 1-100 letters, digits and "
                          f"'._+-' (no '/', '\\' or '..'; it becomes {what})")


def to_plain(obj: Any) -> Any:
    """Dataclasses and ComponentSpecs -> plain TOML-able dicts/lists (None values dropped)."""
    if isinstance(obj, ComponentSpec):
        return obj.to_table()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = to_plain(getattr(obj, f.name))
            if value is not None:
                out[f.name] = value
        return out
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [to_plain(v) for v in obj]
    return obj


def params_help(cls: type | None) -> list[tuple[str, str, str]]:
    """(name, type, default) for every field of a Params dataclass."""
    if cls is None:
        return []
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        if f.metadata.get("bounds"):
            default += f" ({bounds_text(f.metadata['bounds'])})"
        rows.append((f.name, type_name(hints[f.name]), default))
    return rows


def _show(value: Any) -> str:
    text = repr(value)
    kind = type(value).__name__
    kind = {"dict": "table", "list": "list", "str": "string"}.get(kind, kind)
    return f"{text[:60]} ({kind})"
