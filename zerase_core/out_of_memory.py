"""Running out of memory, told one way on every device.

CUDA raises ``torch.OutOfMemoryError``; Apple's MPS allocator and the CPU allocator raise a plain ``RuntimeError``
whose message says so. Every answer of the pack (auto checkpointing's retry, the x_t pool's smaller batches, the
command line's advice) is written against ``torch.OutOfMemoryError``: :func:`told_as_out_of_memory` raises that for
the others too, so a Mac or a CPU run gets the same answers as a CUDA one.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from typing import Iterator

import torch

# What torch's allocators write when they cannot allocate, where they raise a plain RuntimeError: MPS
# ("MPS backend out of memory (MPS allocated: …"), the CPU ("DefaultCPUAllocator: can't allocate memory: you
# tried to allocate …"; on Windows "DefaultCPUAllocator: not enough memory: …"), and cuBLAS's workspace on CUDA.
# Specific words: a bare "out of memory" also names failures that are not the device's.
MESSAGES = ("mps backend out of memory", "defaultcpuallocator: can't allocate memory",
            "defaultcpuallocator: not enough memory", "cublas_status_alloc_failed")


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in MESSAGES)


@contextmanager
def told_as_out_of_memory() -> Iterator[None]:
    """Raise ``torch.OutOfMemoryError`` for a device that ran out of memory whatever it raised (the original chained),
    and anything else as it was."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, torch.OutOfMemoryError) or not is_out_of_memory(err):
            raise
        raise torch.OutOfMemoryError(str(err)) from err


def release(err: BaseException) -> None:
    """Free what the failed attempt behind ``err`` still holds (its tensors, through its frames), before it is tried
    again: the tracebacks of ``err``, of what it was raised from and of what was being handled when it was raised are
    cleared and dropped (the caller tells of the failure in its own words).

    Python frees them with the exception once the except clause ends, unless something still holds the exception: a
    debugger, a log handler, or a reference cycle through its frames, which waits for the garbage collector. With a
    RuntimeError told as out of memory (:func:`told_as_out_of_memory`: MPS, the CPU), a test run on Python 3.12 and
    torch 2.11 found the failed forward's input still alive at the retry (not on Python 3.11 and torch 2.13; what held
    it there was not found). Clearing the frames' locals is not enough: a frame keeps its function, and torch's
    Module.__call__ runs hooks in a closure whose cells hold the layer's inputs; dropping the tracebacks frees those
    frames whatever holds the exception."""
    pending, seen = [err], set()
    while pending:  # both links: raised from one error while another was handled, each holds frames
        err = pending.pop()
        if err is None or id(err) in seen:  # chains can loop (one re-raised from the other)
            continue
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)  # locals first: a cycle through them needs no collector then
        err.__traceback__ = None
        pending += [err.__cause__, err.__context__]


def empty_cache(device: torch.device) -> None:
    """Give the blocks torch's allocator caches on ``device`` back, after a failed attempt's tensors are freed, so
    that the next attempt's layout can fit."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
