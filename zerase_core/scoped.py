"""Set attributes for the length of a ``with`` block; the old values come back however it ends.

The backends hand per-call state (layout, attention recorder, row groups, LoRA switch) to hooks
that ComfyUI or diffusers call deep inside a forward. That state must not outlive the call, also
when the call raises (a cancelled run, a NaN): a stale layout would gate the next model wrongly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def scoped(obj: Any, **values: Any) -> Iterator[Any]:
    previous = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield obj
    finally:
        for name, value in previous.items():
            setattr(obj, name, value)
