"""Timing callables on a device: medians of interleaved rounds, and peak GPU memory above what is resident.

Speed is measured here and printed as ratios against a baseline run in the same process, never asserted in tests.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Callable

import torch

from ..errors import ZEraseError
from ..out_of_memory import release

log = logging.getLogger(__name__)


def check_timing(steps: int, repeats: int = 1) -> None:
    """Refuse, before any measuring, a timing with nothing to take a median of (every figure would be NaN)."""
    if steps < 1 or repeats < 1:
        raise ZEraseError(f"--steps and --repeats must be at least 1; got {steps} and {repeats}.")


def device_sync(backend) -> Callable[[], None]:
    """What waits for ``backend``'s device to finish its queued work (a no-op on the CPU), for timing."""
    device = backend.device
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def interleaved_medians(variants: dict[str, Callable[[], object]], steps: int, repeats: int,
                        sync: Callable[[], None], on_oom: Callable[[str], None] | None = None,
                        warm_up: bool = True, switch: Callable[[str], None] = lambda name: None) -> dict[str, float]:
    """Median seconds per call of each variant, timed round-robin: ``repeats`` rounds of ``steps`` calls each.

    Interleaving spreads a load spike on a shared machine over every variant instead of
    one; each variant gets one untimed warm-up call first (unless the caller just ran each once).
    ``switch(name)`` runs untimed before each variant's calls: what changing to it costs once (a model re-patched).
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    live = dict(variants)
    for name, fn in list(live.items()):
        try:
            if warm_up:
                switch(name), fn(), sync()
        except torch.OutOfMemoryError as err:
            release(err)  # the next variants get the room back, whatever still holds the error
            del live[name]
            if on_oom:
                on_oom(name)
    for _ in range(repeats):
        for name, fn in live.items():
            switch(name), sync()
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) if t else float("nan") for name, t in times.items()}


def peak_gib(variants: dict[str, Callable[[], object]], sync: Callable[[], None],
             switch: Callable[[str], None] = lambda name: None) -> dict[str, float]:
    """Each variant's peak GPU memory above what is resident (weights, pool), GiB; inf where it runs out.
    ``switch(name)`` runs before each variant is measured, as in :func:`interleaved_medians`."""
    peaks = {}
    for name, fn in variants.items():
        switch(name), sync(), torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            fn(), sync()
            peaks[name] = (torch.cuda.max_memory_allocated() - resident) / 2**30
        except torch.OutOfMemoryError as err:
            release(err)
            peaks[name] = float("inf")
            log.warning("%s ran out of memory: not timed", name)
    return peaks
