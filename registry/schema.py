"""Parameter schemas read from factory signatures and type hints.

A parameter's type hint says what a spec string may pass: ``int``, ``float``, ``str``, ``bool``,
``Literal[...]`` (allowed values), ``Optional[...]``, ``Sequence[int]`` / ``tuple[int, ...]`` and
``Annotated[int, Range(1, 512)]`` (an inclusive range). Anything else is accepted as any literal.
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Range:
    """Numeric bounds for ``Annotated[int | float, Range(lo, hi)]``; None = unbounded.

    Inclusive, except ``lo`` when ``lo_open`` (``Range(0, lo_open=True)``: greater than 0).
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def describe(self) -> str:
        lo = "-inf" if self.lo is None else _fmt(self.lo)
        hi = "inf" if self.hi is None else _fmt(self.hi)
        return f"{'(' if self.lo_open else '['}{lo}, {hi}]"

    def contains(self, x: float) -> bool:
        above = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
        return above and (self.hi is None or x <= self.hi)


NO_DEFAULT = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a registered architecture or plugin."""

    name: str
    annotation: Any
    default: Any = NO_DEFAULT

    @property
    def required(self) -> bool:
        return self.default is NO_DEFAULT

    @property
    def type_name(self) -> str:
        return type_name(self.annotation)

    @property
    def choices(self) -> tuple | None:
        return _choices(self.annotation)

    @property
    def range(self) -> Range | None:
        return _range(self.annotation)

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to this parameter's type, or raise ValueError saying why."""
        return check_value(self.annotation, value)

    def to_json(self) -> dict:
        out = {"name": self.name, "type": self.type_name}
        out["default"] = None if self.required else _jsonable(self.default)
        out["required"] = self.required
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.range is not None:
            out["range"] = [self.range.lo, self.range.hi]
            if self.range.lo_open:
                out["range_lo_open"] = True
        return out


def params_from_signature(fn: Callable, skip: Sequence[str] = ()) -> tuple[Param, ...]:
    """Read keyword parameters (name, type hint, default) from ``fn``'s signature."""
    hints = typing.get_type_hints(fn, include_extras=True)
    out = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.name == "self":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out.append(Param(p.name, hints.get(p.name, Any), p.default))
    return tuple(out)


def _strip(annotation):
    """Annotated[T, ...] → (T, metadata)."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        return base, tuple(meta)
    return annotation, ()


def _range(annotation) -> Range | None:
    base, meta = _strip(annotation)
    for m in meta:
        if isinstance(m, Range):
            return m
    for arg in _union_args(base):
        r = _range(arg)
        if r is not None:
            return r
    return None


def _choices(annotation) -> tuple | None:
    base, _ = _strip(annotation)
    if typing.get_origin(base) is typing.Literal:
        return typing.get_args(base)
    for arg in _union_args(base):
        c = _choices(arg)
        if c is not None:
            return c
    return None


def _union_args(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, _UnionType):
        return typing.get_args(annotation)
    return ()


_UnionType = type(int | None)


def type_name(annotation) -> str:
    """Short human-readable name of a type hint: ``int``, ``str | None``, ``seq[int]``."""
    base, _ = _strip(annotation)
    origin = typing.get_origin(base)
    if base is Any or base is inspect.Parameter.empty:
        return "any"
    if origin is typing.Literal:
        return "|".join(repr(c) for c in typing.get_args(base))
    if origin in (typing.Union, _UnionType):
        names = [type_name(a) for a in typing.get_args(base) if _literal_friendly(a)]
        return " | ".join(names)
    if _is_sequence(base):
        args = typing.get_args(base)
        inner = type_name(args[0]) if args else "any"
        return f"seq[{inner}]"
    if base is type(None):
        return "None"
    return getattr(base, "__name__", str(base))


def _is_sequence(tp) -> bool:
    origin = typing.get_origin(tp) or tp
    if origin in (collections.abc.Iterable, typing.Iterable):
        return True
    return origin in (list, tuple, Sequence, typing.Sequence) or (
        isinstance(origin, type) and origin is not str and issubclass(origin, Sequence)
    )


def _literal_friendly(tp) -> bool:
    """False for types a spec string can never hold (dicts, callables, modules)."""
    origin = typing.get_origin(tp) or tp
    if origin in (dict, typing.Dict, typing.Callable, collections.abc.Callable):
        return False
    return not getattr(origin, "__module__", "").startswith("torch")


def check_value(annotation, value):
    """Validate and normalise ``value`` against ``annotation``; raise ValueError with the reason."""
    base, _ = _strip(annotation)
    out = _check(base, value)
    rng = _range(annotation)
    if rng is not None and isinstance(out, (int, float)) and not isinstance(out, bool):
        if not rng.contains(out):
            raise ValueError(f"{_fmt(out)} is out of range {rng.describe()}")
    return out


def _check(tp, value):
    tp, _ = _strip(tp)
    origin = typing.get_origin(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return _freeze(value)
    if tp is type(None):
        if value is None:
            return None
        raise ValueError(f"expected None, got {_describe(value)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        for a in allowed:
            if value == a and type(value) is type(a):
                return a
        raise ValueError(f"{value!r} is not one of {', '.join(repr(a) for a in allowed)}")
    if origin in (typing.Union, _UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if not _literal_friendly(arg):
                continue
            try:
                return _check(arg, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"expected {type_name(tp)}, got {_describe(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected bool (True/False), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected int, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"expected float, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected str, got {_describe(value)}")
    if _is_sequence(tp):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {_describe(value)}")
        args = typing.get_args(tp)
        if len(args) > 1 and args[-1] is not Ellipsis:  # fixed-length tuple[int, str]
            if len(args) != len(value):
                raise ValueError(f"expected {len(args)} items, got {len(value)}")
            return tuple(_check(a, v) for a, v in zip(args, value))
        inner = args[0] if args else Any
        return tuple(_check(inner, v) for v in value)
    if not _literal_friendly(tp):
        raise ValueError(f"a spec string cannot hold a {type_name(tp)}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"expected {type_name(tp)}, got {_describe(value)}")


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"


def _fmt(x) -> str:
    return repr(x) if not isinstance(x, float) or not x.is_integer() else str(int(x))


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
