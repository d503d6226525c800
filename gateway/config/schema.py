"""Building frozen dataclasses from parsed YAML, naming the field path of every error.

A field's type annotation says what it accepts (int, float, str, bool, Literal,
tuple[X, ...], dict[str, X], a nested dataclass, ``X | None``); ``field`` metadata
adds bounds (``min``, ``max``), a ``pattern`` or a ``parse`` function for values
with their own syntax (durations, times, networks, routes). Unknown keys are
errors, with a suggestion when one is close. All errors are collected, not just
the first.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class Invalid(ValueError):
    """Raised by ``parse`` functions; the message says what is wrong."""


@dataclasses.dataclass(slots=True)
class Problems:
    """Errors found so far, as (field path, reason)."""

    items: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(self, path: str, reason: str) -> None:
        self.items.append((path, reason))


def spec(
    default: Any = dataclasses.MISSING,
    *,
    min: float | None = None,
    max: float | None = None,
    pattern: str | None = None,
    parse: Callable[[Any], Any] | None = None,
    shorthand: Callable[[Any], Mapping[str, Any]] | None = None,
    doc: str = "",
) -> Any:
    """A dataclass field with validation metadata.

    ``shorthand`` turns a scalar into the mapping a nested dataclass is built from
    (``admission_ratio: 10`` for ``admission_ratio: {ratio: 10}``).
    """
    metadata = {
        "min": min,
        "max": max,
        "pattern": pattern,
        "parse": parse,
        "shorthand": shorthand,
        "doc": doc,
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("use immutable defaults (tuple, MappingProxyType)")
    return dataclasses.field(default=default, metadata=metadata)


def build(cls: type[T], data: Any, path: str, problems: Problems) -> T | None:
    """An instance of dataclass ``cls`` from ``data``, or None after recording why not."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.add(path, f"must be a mapping, got {_describe(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    before = len(problems.items)
    for key in data:
        if key not in fields:
            problems.add(_join(path, str(key)), _unknown(str(key), fields))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        where = _join(path, name)
        if name in data:
            values[name] = convert(hints[name], data[name], where, problems, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.add(where, "is required")
    if len(problems.items) > before:
        return None
    return cls(**values)


def salvage(cls: type[Any], data: Any) -> Any:
    """What can be read of ``data`` for checks across fields while some fields are
    invalid: an instance of ``cls`` when every field is valid, else a dict of the fields
    that are (nested dataclasses salvaged the same way; lists and mappings of them item
    by item). Problems are not recorded: ``build`` reported them already."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        return {}
    whole = build(cls, data, "", Problems())
    if whole is not None:
        return whole
    hints = typing.get_type_hints(cls)
    valid: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = _salvage_value(hints[f.name], data[f.name], f.metadata)
            if value is not _INVALID:
                valid[f.name] = value
        elif f.default is not dataclasses.MISSING:
            valid[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            valid[f.name] = f.default_factory()
    return valid


_INVALID = object()


def _salvage_value(kind: Any, value: Any, meta: Mapping[str, Any]) -> Any:
    inner = _dataclass_of(kind)
    origin = get_origin(kind)
    if inner is not None and value is not None and meta.get("parse") is None:
        shorthand = meta.get("shorthand")
        if shorthand is not None and not isinstance(value, Mapping):
            value = shorthand(value)
        return salvage(inner, value)
    element = _dataclass_of(get_args(kind)[0]) if origin is tuple else None
    if element is not None:
        return [salvage(element, v) for v in value] if isinstance(value, list) else _INVALID
    if origin in (dict, Mapping, types.MappingProxyType) and _dataclass_of(get_args(kind)[1]):
        item = _dataclass_of(get_args(kind)[1])
        if not isinstance(value, Mapping):
            return _INVALID
        return {str(k): salvage(typing.cast(type, item), v) for k, v in value.items()}
    problems = Problems()
    converted = convert(kind, value, "", problems, meta)
    return _INVALID if problems.items else converted


def _dataclass_of(kind: Any) -> type[Any] | None:
    """The dataclass ``kind`` is, or is ``X | None`` of; else None."""
    if get_origin(kind) in (Union, types.UnionType):
        kinds = [a for a in get_args(kind) if a is not type(None)]
        kind = kinds[0] if len(kinds) == 1 else None
    return typing.cast(type, kind) if dataclasses.is_dataclass(kind) else None


def convert(kind: Any, value: Any, path: str, problems: Problems, meta: Mapping[str, Any]) -> Any:
    parse = meta.get("parse")
    if parse is not None:
        if value is None and _optional(kind):
            return None
        try:
            parsed = parse(value)
        except Invalid as exc:
            problems.add(path, str(exc))
            return None
        if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            _bounds(parsed, path, problems, meta)  # bounds hold for parsed numbers too
        return parsed
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in get_args(kind) if a is not type(None)]
        return convert(inner, value, path, problems, meta)
    if origin is Literal:
        choices = get_args(kind)
        if value not in choices:
            problems.add(path, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is tuple:
        return _sequence(get_args(kind)[0], value, path, problems, meta)
    if origin in (dict, Mapping, types.MappingProxyType):
        return _mapping(get_args(kind)[1], value, path, problems, meta)
    if dataclasses.is_dataclass(kind):
        shorthand = meta.get("shorthand")
        if shorthand is not None and not isinstance(value, Mapping):
            value = shorthand(value)
        return build(typing.cast(type, kind), value, path, problems)
    return _scalar(kind, value, path, problems, meta)


class FromEnvironment(str):
    """Text that ``${VAR}`` expansion produced. The environment holds only strings, so
    a number or true/false field reads such text as its value (``stock: ${STOCK}``)."""


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def typed(kind: Any, value: Any) -> Any:
    """``value`` as a ``kind`` (int, float or bool) when it is environment text that
    spells one; anything else unchanged (and refused by the field as it is)."""
    if not isinstance(value, FromEnvironment):
        return value
    text = value.strip()
    if kind is bool:
        return {"true": True, "false": False}.get(text.lower(), value)
    if kind is int and _INTEGER.fullmatch(text):
        return int(text)
    if kind is float and _DECIMAL.fullmatch(text):
        return float(text)
    return value


def _scalar(kind: Any, value: Any, path: str, problems: Problems, meta: Mapping[str, Any]) -> Any:
    value = typed(kind, value)
    if kind is bool:
        if not isinstance(value, bool):
            problems.add(path, f"must be true or false, got {_describe(value)}")
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.add(path, f"must be an integer, got {_describe(value)}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.add(path, f"must be a number, got {_describe(value)}")
            return value
        value = float(value)
    if kind is str:
        if not isinstance(value, str):
            problems.add(path, f"must be a string, got {_describe(value)}")
            return value
        pattern = meta.get("pattern")
        if pattern and not re.fullmatch(pattern, value):
            problems.add(path, f"{value!r} does not match {pattern}")
        return value
    _bounds(value, path, problems, meta)
    return value


def _bounds(value: float, path: str, problems: Problems, meta: Mapping[str, Any]) -> None:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        problems.add(path, f"must be >= {_number(low)}, got {_number(value)}")
    if high is not None and value > high:
        problems.add(path, f"must be <= {_number(high)}, got {_number(value)}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _sequence(item: Any, value: Any, path: str, problems: Problems, meta: Mapping[str, Any]) -> Any:
    if not isinstance(value, list):
        problems.add(path, f"must be a list, got {_describe(value)}")
        return ()
    return tuple(convert(item, v, f"{path}[{i}]", problems, meta) for i, v in enumerate(value))


def _mapping(item: Any, value: Any, path: str, problems: Problems, meta: Mapping[str, Any]) -> Any:
    if not isinstance(value, Mapping):
        problems.add(path, f"must be a mapping, got {_describe(value)}")
        return types.MappingProxyType({})
    return types.MappingProxyType(
        {str(k): convert(item, v, _join(path, str(k)), problems, meta) for k, v in value.items()}
    )


def _unknown(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
    return f"unknown field{hint}"


def _optional(kind: Any) -> bool:
    return get_origin(kind) in (Union, types.UnionType) and type(None) in get_args(kind)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    kind = "str" if isinstance(value, str) else type(value).__name__  # FromEnvironment too
    shown = repr(str(value)) if isinstance(value, str) else repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{kind} {shown}"
