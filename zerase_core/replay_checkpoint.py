"""Gradient checkpointing for layers whose forward reads per-call state besides its arguments.

A gated layer reads the call's token layout and whether its LoRA is on, and the attention recorder collects the
mass; backward recomputes the layer after the call has left the contexts that set them. So the state is taken when
the layer first runs and put back around the recomputation: the recomputed graph is the first one (the gate applied,
the mass computed) exactly. Both hosts (diffusers, ComfyUI) checkpoint their main layers through this.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager

from torch.utils.checkpoint import checkpoint


def replayed_checkpoint(forward: Callable[..., Any], replay: Callable[[], ContextManager], *args, **kwargs) -> Any:
    """``forward(*args, **kwargs)``, checkpointed; it runs inside ``replay()`` both times."""

    def run(*inner_args, **inner_kwargs):
        with replay():
            return forward(*inner_args, **inner_kwargs)

    # No randomness in a Z-Image layer (no dropout): no RNG state to stash and restore per layer and call.
    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
