"""Declared, validated policy parameters.

A policy is a dataclass whose fields are its parameters. ``param()`` declares a
field with its allowed range; :func:`validate` checks every field of an instance
and raises a ``ValueError`` / ``TypeError`` naming the parameter, the value and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def param(default: Any, *, min: float | None = None, max: float | None = None,
          min_exclusive: bool = False, choices: tuple | None = None, help: str = "") -> Any:
    """A dataclass field with a range (``min``/``max``) or ``choices`` and a help text."""
    meta = {"min": min, "max": max, "min_exclusive": min_exclusive, "choices": choices, "help": help}
    return dataclasses.field(default=default, metadata=meta)


def _allowed_types(hint: Any) -> tuple[tuple[type, ...], bool]:
    """Return (types, optional) for a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        optional = type(None) in args
        kinds = tuple(a for a in args if a is not type(None))
        flat: list[type] = []
        for a in kinds:
            flat.extend(_allowed_types(a)[0])
        return tuple(flat), optional
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(hint)}), False
    if hint is Any:
        return (object,), True
    return ((hint,) if isinstance(hint, type) else (object,)), False


def describe_allowed(field: dataclasses.Field, hint: Any) -> str:
    """Human text for what a field accepts."""
    meta = field.metadata
    kinds, optional = _allowed_types(hint)
    text = " or ".join(k.__name__ for k in kinds)
    if meta.get("choices"):
        text = "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None or hi is not None:
        lo_txt = "" if lo is None else f"{'>' if meta.get('min_exclusive') else '>='} {lo}"
        hi_txt = "" if hi is None else f"<= {hi}"
        text += " " + " and ".join(t for t in (lo_txt, hi_txt) if t)
    if optional:
        text += " (or None)"
    return text


def coerce(field: dataclasses.Field, hint: Any, value: Any, owner: str) -> Any:
    """Check ``value`` against the field; return it (ints widen to float where a float is wanted)."""
    kinds, optional = _allowed_types(hint)
    where = f"{owner}: parameter {field.name!r}"
    if value is None:
        if optional:
            return None
        raise TypeError(f"{where} got None; allowed: {describe_allowed(field, hint)}")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool) and int not in kinds:
        value = float(value)
    ok = any(
        isinstance(value, k) and not (k is int and isinstance(value, bool) and bool not in kinds)
        for k in kinds
    )
    if not ok:
        raise TypeError(
            f"{where} got {value!r} of type {type(value).__name__}; allowed: {describe_allowed(field, hint)}"
        )
    meta = field.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"{where} got {value!r}; allowed: {describe_allowed(field, hint)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{where} got nan; allowed: {describe_allowed(field, hint)}")
        lo, hi = meta.get("min"), meta.get("max")
        below = lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo)
        if below or (hi is not None and value > hi):
            raise ValueError(f"{where} got {value!r}; allowed: {describe_allowed(field, hint)}")
    return value


def validate(obj: Any) -> None:
    """Validate (and normalise) every dataclass field of ``obj`` in place."""
    hints = typing.get_type_hints(type(obj))
    owner = getattr(obj, "name", type(obj).__name__)
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        object.__setattr__(obj, f.name, coerce(f, hints.get(f.name, Any), getattr(obj, f.name), owner))


def check_known(cls: type, params: dict[str, Any]) -> None:
    """Raise if ``params`` names a parameter ``cls`` does not have."""
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    owner = getattr(cls, "name", cls.__name__)
    for key in params:
        if key not in known:
            raise ValueError(f"{owner}: unknown parameter {key!r}; allowed parameters: {', '.join(known)}")


def parameters(cls: type) -> dict[str, Any]:
    """Parameter names and defaults of a policy class, in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.init:
            out[f.name] = f.default if f.default is not dataclasses.MISSING else None
    return out
