"""What a ComfyUI MODEL is beyond its architecture, in a form that survives a restart: the file it was loaded from
and everything patched onto it; the same of the CLIP a run encodes its prompts with. A finished erasure LoRA is
reused only for a model with the same digest; where the digest cannot describe a change (injections, hooks, another
node's callables), there is no digest and no reuse."""

from __future__ import annotations

import enum
import functools
import hashlib
import os
import types
from typing import Any

import torch
from torch import nn

from ..row_sharing import SharedRowsForward
from .object_patches import CheckpointedForward, GatedForward, erasure_chain

SAMPLES = 64  # values read from each tensor: enough to tell two LoRAs apart, cheap on a 6 B model's patches


class _Undescribed(Exception):
    """A change to the model the digest has no stable description of."""


def model_digest(patcher: Any) -> str | None:
    """sha256 over the loader's file (path, size, time) and options, every weight patch (keys, strengths, offsets,
    kinds, sampled values: stock LoRAs and the like, alpha included), every object patch (erasure LoRAs by their
    factors, scale and strength; others, such as ModelSamplingAuraFlow's, by their type, settings and tensors).

    None where nothing stable identifies the model (built in memory: no loader recorded) or where it carries a change
    the digest cannot describe (bypass injections, hooks, weight wrappers, transformer-option patches, an object
    patch holding callables): reusing a LoRA for it could take one trained on another model.
    """
    init = getattr(patcher, "cached_patcher_init", None)
    options = (getattr(patcher, "model_options", None) or {}).get("transformer_options", {})
    opaque = [getattr(patcher, name, None) for name in ("injections", "hook_patches", "weight_wrapper_patches")]
    if init is None or any(opaque) or options.get("patches") or options.get("patches_replace"):
        return None
    h = hashlib.sha256()
    try:
        for arg in init[1]:
            _feed(h, arg)
            for item in arg if isinstance(arg, (list, tuple)) else (arg,):  # Load CLIP records a list of files
                if isinstance(item, (str, os.PathLike)) and os.path.isfile(item):
                    stat = os.stat(item)
                    h.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        for key in sorted(patcher.patches):
            h.update(key.encode())
            _feed(h, patcher.patches[key])
        for key in sorted(patcher.object_patches):
            obj = patcher.object_patches[key]
            if not isinstance(obj, (SharedRowsForward, CheckpointedForward)):  # how this pack runs, not what
                h.update(key.encode())
                _feed(h, obj)
    except _Undescribed:
        return None
    return h.hexdigest()[:16]


def text_encoder_digest(clip: Any) -> str | None:
    """A CLIP as :func:`model_digest` describes a MODEL (its files, options and weight patches: a LoraLoader's CLIP
    side), with what its encoding reads beside them (CLIPSetLastLayer's layer, tokenizer options). A run trains on
    this encoder's prompt features: a LoRA trained with another is another run. None where nothing stable identifies
    it, or where hooks change its conditioning."""
    patcher = getattr(clip, "patcher", None)
    digest = model_digest(patcher) if patcher is not None else None
    if digest is None or getattr(clip, "apply_hooks_to_conds", None):
        return None
    h = hashlib.sha256(digest.encode())
    try:
        _feed(h, getattr(clip, "layer_idx", None))
        _feed(h, getattr(clip, "tokenizer_options", None))
    except _Undescribed:
        return None
    return h.hexdigest()[:16]


def _feed(h, value: Any) -> None:
    """Put a stable description of ``value`` into ``h``, or raise :class:`_Undescribed`."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, enum.Enum)):
        h.update(repr(value).encode())
    elif isinstance(value, os.PathLike):
        h.update(os.fspath(value).encode())
    elif isinstance(value, torch.Tensor):
        h.update(_sample(value))
    elif isinstance(value, (tuple, list)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, dict):
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (set, frozenset)):
        h.update(repr(sorted(value, key=repr)).encode())
    elif isinstance(value, types.FunctionType):
        if "<" in value.__qualname__:  # a lambda or a closure: what it does is not in its name
            raise _Undescribed(value.__qualname__)
        h.update(f"{value.__module__}.{value.__qualname__}".encode())
    elif isinstance(value, types.MethodType):  # another node's bound method: what it runs and on what
        _feed(h, value.__func__)
        _feed(h, value.__self__)
    elif isinstance(value, functools.partial):
        _feed(h, (value.func, value.args, value.keywords))
    elif isinstance(value, types.BuiltinFunctionType):  # a C function, or a bound C method (then its object too)
        h.update(f"{getattr(value, '__module__', None)}.{value.__qualname__}".encode())
        if value.__self__ is not None and not isinstance(value.__self__, types.ModuleType):
            _feed(h, value.__self__)
    elif isinstance(value, GatedForward):
        _feed_erasure_chain(h, value)
    elif isinstance(value, nn.Module) or hasattr(value, "__dict__"):
        _feed_object(h, value)
    else:
        raise _Undescribed(type(value).__qualname__)


_FEEDING: set[int] = set()  # the objects whose description is under way (one met again is a cycle)


def _feed_object(h, obj: Any) -> None:
    """An object by its type and public settings; a module also by its tensors. Not described: an object met again
    inside its own description (an extension's patch that keeps the patcher it patched reached it through
    ``object_patches`` without end), and a model patcher itself."""
    if id(obj) in _FEEDING or hasattr(obj, "object_patches"):
        raise _Undescribed(type(obj).__qualname__)
    _FEEDING.add(id(obj))
    try:
        h.update(f"{type(obj).__module__}.{type(obj).__qualname__}".encode())
        if isinstance(obj, nn.Module):
            for name, tensor in [*obj.named_parameters(), *obj.named_buffers()]:
                h.update(name.encode())
                h.update(_sample(tensor))
        for name in sorted(vars(obj)):
            if not name.startswith("_") and name != "training":
                _feed(h, vars(obj)[name])
    finally:
        _FEEDING.discard(id(obj))


def _feed_erasure_chain(h, forward: Any) -> None:
    """The erasure LoRAs on one qkv (this and earlier installations): factors, scale and strength."""
    for lora in erasure_chain(forward):
        for adapter in lora.adapters.values():  # not by name: each installation's is random
            h.update(f"{adapter.scale}:{adapter.strength}".encode())
            for tensor in adapter.parameters():
                h.update(_sample(tensor))


def _sample(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().reshape(-1)
    values = flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES]
    return repr((tuple(tensor.shape), tensor.dtype)).encode() + values.to("cpu", torch.float32).numpy().tobytes()
