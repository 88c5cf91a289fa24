"""Settings checked against their annotations: a Python caller's ``preserve="blue"`` or ``seed=1.5`` is refused by
name when the settings are made, not found out minutes later (a string iterated as its letters, an allocator's
error after the prompts are encoded).

Lists become tuples (JSON has no tuples) and numpy numbers Python's (``np.int64`` is not JSON, ``np.float32('nan')``
is no ``float`` to a finiteness check); an int is a float's value; a bool is neither (``True`` is 1 to Python, not
to a user). Ranges are the settings' own business (config.py, lora.py).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import sys
import types
import typing

from .errors import ZEraseError, shown


class _Wrong(Exception):
    """A value that is not of its annotated type."""


def settle(settings) -> None:
    """Make ``settings`` (a frozen dataclass) hold each value as its annotated type; refuse the values of another."""
    wrong = []
    for name, hint in _hints(type(settings)).items():
        value = getattr(settings, name)
        try:
            object.__setattr__(settings, name, _as(value, hint))
        except _Wrong:
            wrong.append(f"{name} must be {_said(hint)}; got {type(value).__name__} {shown(repr(value))}")
    if wrong:
        raise ZEraseError(f"{type(settings).__name__}: " + "; ".join(wrong) + ".")


def json_object(value, name: str) -> dict:
    """A JSON object read from a file, or TypeError naming it. dict() also took a list of pairs (and a string's
    message was "dictionary update sequence element #0…"), which the reader then handed on as a list."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


@functools.cache
def _hints(cls: type) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _as(value, hint):
    """``value`` as ``hint`` takes it, or _Wrong."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for each in args:
            try:
                return _as(value, each)
            except _Wrong:
                continue
        raise _Wrong
    if hint is type(None):
        if value is None:
            return None
        raise _Wrong
    if origin is not None:
        return _container(value, origin, args)
    if isinstance(value, bool) and hint is not bool:
        raise _Wrong
    if hint is int and isinstance(value, numbers.Integral):
        return value if type(value) is int else int(value)
    if hint is float and isinstance(value, numbers.Real):
        if isinstance(value, numbers.Integral) and abs(value) > sys.float_info.max:  # 10**400: no float holds it
            raise _Wrong
        return value if type(value) in (int, float) else float(value)
    if isinstance(value, hint):
        return value
    raise _Wrong


def _container(value, origin, args):
    if origin is tuple:
        value = tuple(value) if isinstance(value, list) else value
        if not isinstance(value, tuple):
            raise _Wrong
        each = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(each) != len(value):
            raise _Wrong
        return tuple(_as(v, h) for v, h in zip(value, each))
    if isinstance(value, origin):  # dict[str, Any] and the like: what it holds is its owner's check
        return value
    raise _Wrong


def _said(hint) -> str:
    """``hint`` as a user reads it: "a tuple of str, e.g. ('a',)", "an int", "a float or None"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_said(h) for h in args)
    if hint is type(None):
        return "None"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {args[0].__name__}, e.g. ('a',) for one"
        return f"a tuple of {len(args)} ({', '.join(a.__name__ for a in args)})"
    name = (origin or hint).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
