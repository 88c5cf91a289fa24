"""What an autograd graph still holds, and the attention-mass recorders a backend makes."""

from __future__ import annotations

import torch

def held_bytes(t: torch.Tensor) -> int:
    """Bytes of activations that ``t``'s autograd graph still holds for a backward not yet run.

    For use after a backward: before it, reading a checkpointed node's saved tensor recomputes its layer.
    """
    seen, stack, total = set(), [t.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    value = getattr(node, name)
                except RuntimeError:  # freed by the backward that ran through it
                    continue
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        stack.extend(fn for fn, _ in node.next_functions)
    return total



def keeping_recorders(recorders: list):
    """A backend ``recorder_factory`` that also appends each MassRecorder it makes to ``recorders``."""
    from zerase_core.attention_mass import MassRecorder

    def factory(*args):
        recorders.append(MassRecorder(*args))
        return recorders[-1]

    return factory
