"""Activation memory, measured as the bytes autograd saves for backward.

``saved_bytes`` runs a function under ``torch.autograd.graph.saved_tensors_hooks`` and sums
the storage of every tensor saved for backward (each storage once). That is exactly the
activation memory a training step holds between forward and backward, on any device, so
the CPU can measure what a GPU would hold. It does not see transient buffers freed during
the forward (workspace, temporaries), which the GPU script measures with the allocator.

Two uses: the attention loss per layer (ours, by the layer's own attention call widened by an
indicator value, against the full softmax map), and per-layer activation memory of the student forward
on scaled-down Z-Images, extrapolated to the real model by :func:`real_zimage_estimate`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch

from ..errors import ZEraseError

GiB = 1024**3


def saved_bytes(fn: Callable[[], torch.Tensor], resident: Iterable[torch.Tensor] = ()) -> tuple[int, torch.Tensor]:
    """(bytes saved for backward by ``fn()``, its output). Storages are counted once, and not those of ``resident``
    tensors: a linear layer saves its weight for its input's gradient, but the weights are held anyway, so they are
    no activation memory (counted, they made a layer's bytes grow with the square of its width)."""
    seen: dict[int, int] = {}
    held = {t.untyped_storage().data_ptr() for t in resident}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """The highest the CPU memory torch allocates rose above where it started while ``fn()`` ran.

    The CPU keeps no allocator statistics, as CUDA does, so this reads the profiler's record of every allocation and
    free, in time order. Its per-op summaries will not do: an op's net change is placed at its start, and backward's
    parent ops free at their end what they hold, which read the peak up to 17 % low. The record is torch's own but not
    public API (``experimental_event_tree``, as its memory profiler reads it), so its absence is an error, not 0.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        from torch._C._profiler import _EventType

        changes = sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree(), _EventType.Allocation))
    except (AttributeError, ImportError) as err:
        raise ZEraseError(f"This torch ({torch.__version__}) does not record allocations the way the CPU peak is "
                          f"read ({err}); measure the peak on a GPU instead.") from err
    if not changes:
        raise ZEraseError("The profiler recorded no allocation; no CPU peak to report.")
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak


def _allocations(nodes, tag) -> Iterator[tuple[int, int]]:
    """(time, bytes: positive allocated, negative freed) of every allocation event under ``nodes``."""
    for node in nodes:
        if node.tag == tag:
            yield node.start_time_ns, node.extra_fields.alloc_size
        yield from _allocations(node.children, tag)


def _qkv(tokens: int, heads: int, head_dim: int, dtype: torch.dtype):
    """q, k, v (B, H, L, D) as attention sees them: outputs of an op, freed unless attention keeps them."""
    g = torch.Generator().manual_seed(0)
    shape = (1, heads, tokens, head_dim)
    leaves = [torch.randn(shape, generator=g).to(dtype).requires_grad_(True) for _ in range(3)]
    return [t * 1.0 for t in leaves]  # a product with a Python number saves nothing itself


def attention_loss_bytes(image_tokens: int, text_tokens: int, heads: int, head_dim: int,
                         dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Saved bytes one layer's attention-mass loss adds to the layer's own attention: ours
    (the mass from the attention call itself, widened) vs the materialised softmax map.

    Each is measured as everything autograd keeps for the layer's attention output plus its
    mass, minus what the attention output alone keeps.
    """
    from ..attention_mass import MassRecorder, sdpa
    from .reference_step import MaterialisedMassRecorder

    tokens = image_tokens + text_tokens
    columns = torch.zeros(1, tokens)
    columns[0, image_tokens + 1] = 1.0  # one concept token in the caption
    rows = torch.zeros(1, tokens)
    rows[0, :image_tokens] = 1.0
    attention = sdpa

    def kept(recorder_type) -> int:
        q, k, v = _qkv(tokens, heads, head_dim, dtype)
        if recorder_type is None:
            return saved_bytes(lambda: attention(q, k, v, head_dim**-0.5).sum())[0]
        recorder = recorder_type(columns, rows)
        return saved_bytes(lambda: recorder.attend(0, attention, q, k, v).sum() + recorder.result().sum())[0]

    plain = kept(None)
    return {"ours": kept(MassRecorder) - plain, "materialised": kept(MaterialisedMassRecorder) - plain}


def growth_exponent(tokens: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(tokens): 1 linear, 2 quadratic."""
    return least_squares_slope([math.log(t) for t in tokens], [math.log(max(v, 1.0)) for v in values])


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
