"""Activation memory, measured as the bytes autograd saves for backward.

``saved_bytes`` runs a function under ``torch.autograd.graph.saved_tensors_hooks`` and sums
the storage of every tensor saved for backward (each storage once). That is exactly the
activation memory a training step holds between forward and backward, on any device, so
the CPU can measure what a GPU would hold. It does not see transient buffers freed during
the forward (workspace, temporaries), which the GPU script measures with the allocator.

Two uses: the attention loss per layer (ours, by one extra attention call with an indicator
value, against the full softmax map), and per-layer activation memory of the student forward
on scaled-down Z-Images, extrapolated to the real model by :func:`real_zimage_estimate`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .attention_mass import column_mass

GiB = 1024**3


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """(bytes saved for backward by ``fn()``, its output). Storages are counted once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _qk(tokens: int, heads: int, head_dim: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    shape = (1, heads, tokens, head_dim)  # (B, H, L, D), as attention sees them
    q = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(shape, generator=g).to(dtype).requires_grad_(True)
    return q, k


def attention_loss_bytes(image_tokens: int, text_tokens: int, heads: int, head_dim: int,
                         dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Saved bytes of one layer's attention-mass loss: ours vs the materialised softmax map.

    q and k are leaves here, so neither method is charged for them (the model saves them
    anyway); what remains is what the loss itself adds.
    """
    from .reference_step import MaterialisedMassRecorder

    tokens = image_tokens + text_tokens
    columns = torch.zeros(1, tokens)
    columns[0, image_tokens + 1] = 1.0  # one concept token in the caption
    rows = torch.zeros(1, tokens)
    rows[0, :image_tokens] = 1.0
    result = {}
    for name in ("ours", "materialised"):
        q, k = _qk(tokens, heads, head_dim, dtype)
        leaves = {q.untyped_storage().data_ptr(), k.untyped_storage().data_ptr()}
        if name == "ours":
            fn = lambda: column_mass(q, k, columns).mean()  # noqa: E731
        else:
            recorder = MaterialisedMassRecorder(columns, rows)
            fn = lambda: (recorder.record(0, q, k), recorder.result().mean())[1]  # noqa: E731
        seen: dict[int, int] = {}

        def pack(t, seen=seen):
            storage = t.untyped_storage()
            if storage.data_ptr() not in leaves:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        result[name] = sum(seen.values())
    return result


def growth_exponent(tokens: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(tokens): 1 linear, 2 quadratic."""
    xs, ys = [math.log(t) for t in tokens], [math.log(max(v, 1.0)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
