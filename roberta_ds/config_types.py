"""Type checking and coercion of config dataclass fields, driven by their annotations.

Configs come from YAML (PyYAML follows YAML 1.1: `1e-3` and `5e5` are strings, only `1.0e-3` is a
float), from JSON and from `--set key=value` (JSON when it parses, else a string). One function,
`coerce_fields`, called first in every config's `__post_init__`, turns what those give into the
annotated type or refuses it naming the field, the value, its type and what was expected:

    optim.lr: expected a number, got 'abc' (str)

Accepted forms (anything else is refused):
- `int`: an int, or a string or float with an integral value (`"24000"`, `"5e5"`, `500000.0`);
- `float`: an int or a float, or a string that parses as one (`"1e-3"`, `"6E-4"`); never NaN or inf;
- `bool`: true/false, or YAML's forms as strings (`yes/no`, `on/off`, `y/n`, `true/false`, `1/0`,
  any case), or the ints 0 and 1;
- `str`: a string;
- `X | None`: None (or the strings `null`/`none`), else as X; `A | B`: the first member that accepts;
- `tuple[X, ...]` / `tuple[X, Y]`: a list or tuple, each element as its type (length checked);
- `dict[str, X]`: a mapping with string keys; a config dataclass: an instance, or a mapping of its
  fields; `Any`: anything.
Booleans are never numbers here (`True` is not accepted as an int or a float).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from roberta_ds.errors import ConfigError

TRUE_WORDS = frozenset({"true", "yes", "on", "y", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "n", "0"})
NONE_WORDS = frozenset({"null", "none", "~"})


class _Refused(Exception):
    """A value that does not fit one annotation; `expected` says what would have."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved annotation} of a dataclass (annotations are strings under
    `from __future__ import annotations`; get_type_hints evaluates them in the class's module)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def describe(annotation: Any) -> str:
    """What `annotation` accepts, in the words of an error message."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if annotation is Any:
        return "any value"
    if origin in (typing.Union, types.UnionType):
        members = [describe(a) for a in args if a is not type(None)]
        if type(None) in args:
            members.append("null")
        return " or ".join(members)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} {_plural(args[0]) if len(set(args)) == 1 else 'values'}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(annotation):
        return f"a mapping of {annotation.__name__} fields"
    return repr(annotation)


def _plural(annotation: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
        annotation, f"({describe(annotation)})")


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """`value` as `annotation` describes it, or ConfigError naming `name`, the value and its type."""
    try:
        return _coerce(value, annotation, name)
    except _Refused as e:
        raise ConfigError(f"{name}: expected {e.expected}, got {value!r} ({type(value).__name__})") from None


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is bool:
        return _to_bool(value)
    if annotation is int:
        return _to_int(value)
    if annotation is float:
        return _to_float(value)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Refused("a string")
    if origin in (typing.Union, types.UnionType):
        return _to_union(value, annotation, args, name)
    if origin is tuple:
        return _to_tuple(value, annotation, args, name)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Refused(describe(annotation))
        return {k: coerce(v, args[1], f"{name}.{k}") for k, v in value.items()} if args else dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(field_types(annotation)))
            if unknown:
                known = sorted(field_types(annotation))
                raise ConfigError(f"{name}: unknown field(s) {unknown}; known: {known}")
            return annotation(**value)
        raise _Refused(describe(annotation))
    raise TypeError(f"{name}: config_types cannot check the annotation {annotation!r}; add it to _coerce")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise _Refused("true or false")


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _Refused("a number")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip().replace("_", ""))
        except ValueError:
            raise _Refused("a number") from None
    else:
        raise _Refused("a number")
    if not math.isfinite(out):
        raise _Refused("a finite number")
    return out


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Refused("an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            pass
    try:
        number = _to_float(value)
    except _Refused:
        raise _Refused("an integer") from None
    if not number.is_integer():
        raise _Refused("an integer")
    return int(number)


def _to_union(value: Any, annotation: Any, args: tuple[Any, ...], name: str) -> Any:
    members = [a for a in args if a is not type(None)]
    none_word = isinstance(value, str) and value.strip().lower() in NONE_WORDS
    if type(None) in args and (value is None or none_word):
        return None
    for member in members:  # in order: "true" is True for `bool | str`, "auto" stays a string
        try:
            return _coerce(value, member, name)
        except _Refused:
            continue
    raise _Refused(describe(annotation))


def _to_tuple(value: Any, annotation: Any, args: tuple[Any, ...], name: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise _Refused(describe(annotation))
    if len(args) == 2 and args[1] is Ellipsis:
        kinds = [args[0]] * len(value)
    elif len(value) != len(args):
        raise _Refused(describe(annotation))
    else:
        kinds = list(args)
    return tuple(coerce(v, kind, f"{name}[{i}]") for i, (v, kind) in enumerate(zip(value, kinds)))


def coerce_fields(obj: Any, section: str) -> None:
    """Coerce every field of the (frozen) dataclass `obj` in place to its annotated type, or raise
    ConfigError naming `section.field`. Call it first in `__post_init__`, before comparisons."""
    prefix = f"{section}." if section else ""
    for name, annotation in field_types(type(obj)).items():
        value = getattr(obj, name)
        new = coerce(value, annotation, f"{prefix}{name}")
        if new is not value:
            object.__setattr__(obj, name, new)
