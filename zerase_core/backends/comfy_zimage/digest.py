"""What a ComfyUI MODEL is beyond its architecture, in a form that survives a restart: the file it was loaded from
and the patches on it. A finished erasure LoRA is reused only for a model with the same digest."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterator

import torch

from ..row_sharing import SharedRowsForward
from .object_patches import CheckpointedForward, GatedForward

SAMPLES = 64  # values read from each tensor: enough to tell two LoRAs apart, cheap on a 6 B model's patches


def model_digest(patcher: Any) -> str | None:
    """sha256 over the loader's file (path, size, time) and options, every weight patch (key, strengths, sampled
    values: stock LoRAs and the like) and every object patch (erasure LoRAs by their sampled factors, others by
    type). None for a MODEL built in memory (no loader recorded): nothing stable identifies it."""
    init = getattr(patcher, "cached_patcher_init", None)
    if init is None:
        return None
    h = hashlib.sha256()
    for arg in init[1]:
        h.update(repr(arg).encode())
        if isinstance(arg, (str, os.PathLike)) and os.path.isfile(arg):
            stat = os.stat(arg)
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    for key in sorted(patcher.patches):
        h.update(key.encode())
        for patch in patcher.patches[key]:
            strengths = [p for p in patch if isinstance(p, (int, float)) or p is None]
            h.update(repr(strengths).encode())
            for tensor in _tensors(patch):
                h.update(_sample(tensor))
    for key in sorted(patcher.object_patches):
        obj = patcher.object_patches[key]
        if isinstance(obj, (SharedRowsForward, CheckpointedForward)):
            continue  # how this pack runs the model, not what it computes
        h.update(f"{key}:{type(obj).__qualname__}".encode())
        for tensor in _erasure_factors(obj):
            h.update(_sample(tensor))
    return h.hexdigest()[:16]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a weight patch (tuples, lists, ComfyUI's weight adapters with ``.weights``)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "weights"):
        yield from _tensors(value.weights)


def _erasure_factors(forward: Any) -> Iterator[torch.Tensor]:
    """The factors of an erasure-LoRA chain on one qkv (this and earlier installations)."""
    while isinstance(forward, GatedForward):
        yield from forward.lora.adapters.parameters()
        forward = getattr(forward.lora.base_layer, "_previous", None)


def _sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    values = flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES]
    return repr(tuple(tensor.shape)).encode() + values.to("cpu", torch.float32).numpy().tobytes()
