"""What an autograd graph still holds, and the attention-mass recorders a backend makes."""

from __future__ import annotations

import torch


def held_bytes(t: torch.Tensor) -> int:
    """Bytes of the storages that ``t``'s autograd graph still holds for a backward not yet run (each storage once).

    For use after a backward: before it, reading a checkpointed node's saved tensor recomputes its layer.
    """
    seen, stack, storages = set(), [t.grad_fn], {}
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
                for tensor in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(tensor, torch.Tensor):
                        storage = tensor.untyped_storage()
                        storages[storage.data_ptr()] = storage.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


def keeping_recorders(recorders: list):
    """A backend ``recorder_factory`` that also appends each MassRecorder it makes to ``recorders``."""
    from zerase_core.attention_mass import MassRecorder

    def factory(*args):
        recorders.append(MassRecorder(*args))
        return recorders[-1]

    return factory
