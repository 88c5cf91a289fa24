"""Stopping a run without losing it: Ctrl-C held back while a run's files or its update are written, and the
command line's other stop signals (SIGTERM, SIGHUP) taking Ctrl-C's way."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


# The lists of the ctrl_c_deferred bodies running now, innermost last: where stop_as_ctrl_c puts a stop it holds back.
_HOLDING: list[list[int | str]] = []
_IGNORED, _ASKED = "ignored", "asked"  # marks in a held list beside the signal numbers


@contextmanager
def ctrl_c_deferred(stopping: bool = False) -> Iterator[list[int | str]]:
    """Hold Ctrl-C (SIGINT) back while the body writes: pressed again while a stopped run saves what it has, it
    aborted that save, and the run's progress was lost. Held back, it is delivered once the body has ended, to the
    handler that was there (Python's raises KeyboardInterrupt; an ignoring one ignores it), so the user still stops;
    unless ``stopping``: the caller is on its way out already, with what stopped it to tell, and a Ctrl-C asks for
    nothing more. A stop asked for by :func:`stop_as_ctrl_c` is held alike and delivered as KeyboardInterrupt. A body
    that raises goes on raising its own error, which ends the caller as the Ctrl-C would have; a caller that may take
    the body again instead (a training step out of memory) asks :func:`stops` of the list given by ``as``.

    Only in the main thread, the one Python runs signal handlers in and lets set them; elsewhere (ComfyUI runs nodes
    in a worker thread and cancels them by other means) the body runs as it is. So does a handler not set from Python
    (an embedding program's), which could not be put back.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    held: list[int | str] = []  # signal numbers, and the marks below
    if previous is None:
        yield held
        return
    if previous == signal.SIG_IGN:
        held.append(_IGNORED)  # a Ctrl-C held here would be ignored: stops() says so
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    _HOLDING.append(held)
    try:
        yield held
    finally:
        _HOLDING.pop()  # the innermost: bodies end in the order they began (remove() took the first equal list)
        signal.signal(signal.SIGINT, previous)  # handles a Ctrl-C still pending with ours first
    if stopping or not stops(held):
        return
    if _ASKED in held:
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGINT)  # to the handler put back; Python's raises KeyboardInterrupt here


def stops(held: list) -> bool:
    """Whether what a ctrl_c_deferred body held back stops its caller: a stop asked for, or a Ctrl-C not ignored."""
    return _ASKED in held or (signal.SIGINT in held and _IGNORED not in held)


def stop_as_ctrl_c() -> None:
    """Stop as Ctrl-C does, for another signal (the command line's SIGTERM and SIGHUP): held back where a
    ctrl_c_deferred body runs, else KeyboardInterrupt now. Sent as a SIGINT instead, it was ignored where Ctrl-C is (a
    background job of a script), and the stop was lost."""
    if _HOLDING:
        _HOLDING[-1].append(_ASKED)
    else:
        raise KeyboardInterrupt


@contextmanager
def other_stops_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (``timeout``, ``docker stop``, a job scheduler) and SIGHUP (a closed terminal) take Ctrl-C's way while a
    command runs: a stopped run saves its LoRA so far and its checkpoint and says how to resume. Left to the system
    they ended the process at once, and the steps since the last checkpoint were lost (a review: 140 of 440). Only
    where no one else set a handler (nohup's ignored SIGHUP stays ignored); put back after. The command line's alone:
    ComfyUI's worker thread has its own cancel."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {}
    for name in ("SIGTERM", "SIGHUP"):  # Windows has no SIGHUP
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) == signal.SIG_DFL:
            kept[number] = signal.signal(number, _as_ctrl_c)
    try:
        yield
    finally:
        for number, handler in kept.items():
            signal.signal(number, handler)


def _as_ctrl_c(signum: int, frame) -> None:
    stop_as_ctrl_c()  # held back, as Ctrl-C is, where a run holds it (from AdamW's update to the step's record)
