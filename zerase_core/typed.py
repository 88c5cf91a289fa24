"""Settings checked against their annotations: a Python caller's ``preserve="blue"`` or ``seed=1.5`` is refused by
name when the settings are made, not found out minutes later (a string iterated as its letters, an allocator's
error after the prompts are encoded).

Lists become tuples (JSON has no tuples); an int is a float's value; a bool is neither (``True`` is 1 to Python, not
to a user). Ranges are the settings' own business (config.py, lora.py).
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing

from .errors import ZEraseError


def settle(settings) -> None:
    """Make ``settings`` (a frozen dataclass) hold tuples where it was given lists; refuse values of the wrong type."""
    hints = typing.get_type_hints(type(settings))
    wrong = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, list):
            value = tuple(value)
            object.__setattr__(settings, f.name, value)
        if not _is(value, hints[f.name]):
            wrong.append(f"{f.name} must be {_said(hints[f.name])}; got {type(value).__name__} {value!r}")
    if wrong:
        raise ZEraseError(f"{type(settings).__name__}: " + "; ".join(wrong) + ".")


def _is(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, h) for h in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is(v, args[0]) for v in value)
        return len(value) == len(args) and all(_is(v, h) for v, h in zip(value, args))
    if origin is not None:  # dict[str, Any] and the like: the container's type (what it holds is its owner's check)
        return isinstance(value, origin)
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, numbers.Real)
    if hint is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, hint)


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
