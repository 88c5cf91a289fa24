"""A run's gradient checkpointing: how many main layers are recomputed in backward, from which step, and why.

``on``: every main layer but the last (checkpointing the last saves no memory: :func:`.memory_fit.most_checkpointed`),
from the first step. ``off``: never. ``auto`` decides twice: before the first step, as few layers as let the step's
estimated activations fit the memory free on the device (:mod:`.memory_fit`); and at a step that runs out of memory
after all, as many as ``on``, the step then taken again by the trainer (checkpointing changes where activations are
kept, not the gradients). Each decision holds for the rest of the run; a resumed run keeps the second (checkpoint.py),
since its estimate was short on that card.
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

from . import memory_fit
from .backends.base import Backend
from .config import OUT_OF_MEMORY, TOO_LITTLE_MEMORY
from .out_of_memory import empty_cache

log = logging.getLogger(__name__)


class StepShape(NamedTuple):
    """What a step's activations scale with, beside the model: its sequences and its student rows."""

    image_tokens: int
    caption_tokens: int  # the longest caption of the run
    rows: int  # [c_er, ∅, c_pr], or [c_er, ∅] without preservation prompts


class GradientCheckpointing:
    def __init__(self, backend: Backend, mode: str):
        self.backend, self.mode = backend, mode
        self.from_step: int | None = None  # the first step it applied to; None: not checkpointing
        self.reason: str | None = None  # "on", TOO_LITTLE_MEMORY or OUT_OF_MEMORY
        self.pending = mode == "auto"  # auto estimates once, at the run's first step, with the model loaded
        backend.set_gradient_checkpointing(0)  # as the settings say, whatever the backend was left with
        if mode == "on":
            self.start("on", 1)

    def start(self, reason: str, from_step: int, layers: int | None = None) -> None:
        """Checkpoint the first ``layers`` main layers (by default all worth it: all but the last) from
        ``from_step`` on, for ``reason``: the plan in force, replacing a partial one."""
        most = memory_fit.most_checkpointed(self.backend.n_layers)
        self.backend.set_gradient_checkpointing(most if layers is None else layers)
        self.from_step, self.reason = from_step, reason

    def auto_note(self) -> str:
        """What auto switched on, for a run's summary (it makes steps slower); "" where it checkpointed nothing."""
        if self.mode != "auto" or self.from_step is None:
            return ""
        backend = self.backend
        return (f"checkpointing {backend.checkpointed_layers}/{backend.n_layers} layers from step {self.from_step} "
                f"({self.reason})")

    def before_step(self, step: int, shape: Callable[[], StepShape]) -> None:
        """auto's estimate, once, before the first step this trainer takes; not where a resumed run already
        checkpoints all it would because it ran out of memory."""
        if not self.pending:
            return
        self.pending = False
        if self.from_step is None:
            self.estimate(shape(), step)

    def estimate(self, shape: StepShape, step: int) -> None:
        """Checkpoint from ``step`` as few main layers as let a step fit the memory free on the device with the model
        loaded (the GPU's; on MPS, Metal's working set; on a CPU, the system's)."""
        backend = self.backend
        backend.load()
        available = memory_fit.available_bytes(backend.device)
        dim = backend.fingerprint().get("dim")
        if available is None or dim is None:  # a device that cannot tell, or a host that cannot tell its width
            return
        layers = backend.n_layers
        casts = backend.weight_casts_bytes()  # fp8 weights: their bf16 copies, kept for backward
        plan = memory_fit.plan(*shape, layers, dim, casts, available, backend.dtype.itemsize)
        if plan.checkpointed:
            log.info("A step without gradient checkpointing needs about %.1f GiB, %.1f GiB are free: checkpointing %d "
                     "of %d main layers from the start.", plan.needed / 2**30, available / 2**30, plan.checkpointed,
                     layers)
            self.start(TOO_LITTLE_MEMORY, step, layers=plan.checkpointed)
        if not memory_fit.fits(plan.peak, available):  # told before a step that fails, swaps or spills
            log.warning("A step needs about %.1f GiB even with gradient checkpointing and %.1f GiB are free on "
                        "%s: it may run out of memory, or spill into system memory or swap and run many times slower. "
                        "A lower resolution (height, width) takes less.", plan.peak / 2**30, available / 2**30,
                        backend.device)

    def resume(self, next_step: int, out_of_memory_from: int | None) -> None:
        """A resumed run continuing with ``next_step``. Under auto, one that ran out of memory with fewer layers
        checkpointed (``out_of_memory_from``: the step it began) keeps all it would from that step: its estimate was
        short on this card, and trying again would fail once more (and on ComfyUI reload the model). Any other auto
        run decides again at its first step; "on" checkpoints from the step the run continues with."""
        if self.mode == "on":
            self.start("on", next_step)
        elif self.mode == "auto" and out_of_memory_from is not None:
            self.start(OUT_OF_MEMORY, out_of_memory_from)

    def can_retry(self) -> bool:
        """Whether a step that ran out of memory is taken again: auto's answer, while fewer layers are checkpointed
        than would be."""
        backend = self.backend
        return self.mode == "auto" and backend.checkpointed_layers < memory_fit.most_checkpointed(backend.n_layers)

    def after_out_of_memory(self, step: int) -> None:
        """All main layers worth it from ``step``, which ran out of memory and is taken again, for the rest of the run.
        Called once the failed attempt's tensors are freed, so that the device's cache can be given back."""
        backend = self.backend
        log.warning("Out of memory on %s at step %d with %d of %d main layers checkpointed; taking it again with %d "
                    "(all but the last, whose checkpointing saves nothing), which stays so for the rest of the run "
                    "(the same gradients, up to a third more time per step).", backend.device, step,
                    backend.checkpointed_layers, backend.n_layers, memory_fit.most_checkpointed(backend.n_layers))
        self.start(OUT_OF_MEMORY, step)
        empty_cache(backend.device)
