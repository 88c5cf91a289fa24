"""Following ComfyUI when it rebuilds the model object under the patches.

``ModelPatcher.clone(model_override=...)`` puts the object patches and wrappers of a clone onto another model object
loaded from the same file: dynamic VRAM's non-dynamic delegate does (TorchCompileModel after Apply, hooked
conditioning). Ours would call the old object's modules there. ComfyUI calls every ON_CLONE callback with (source,
clone); :func:`rebind` then builds each erasure LoRA's chain, the refiners' row sharing and each installation's call
state again on the clone's own modules. The adapters (the LoRA's weights) and the gates are shared, so the clone runs
what its source runs, on its own model. Where it cannot follow (another extension's forward patch on the model,
under ours or above them, and a training clone's checkpointing are bound to the old object's modules) it leaves the
clone as it was, and the call state refuses to sample it.
"""

from __future__ import annotations

import types
from typing import Any, Callable

from ...lora import GatedLoRALinear
from ..row_sharing import SharedRowsForward
from .call_state import CallState, call_state_of
from .object_patches import GatedForward, PreviousForward, erasure_chain, own_forward

REBIND_KEY = "zerase_rebind"


class _Unfollowed(Exception):
    """A patch that cannot be built again on another model."""


def rebind(source: Any, clone: Any) -> None:
    """ON_CLONE: where ``clone`` holds another model object than ``source``, our patches on its own modules."""
    if clone.model is source.model:
        return
    from comfy.patcher_extension import WrappersMP

    dit = clone.model.diffusion_model
    wrappers = clone.wrappers.get(WrappersMP.DIFFUSION_MODEL, {})
    calls = {id(state): CallState(state.node, dit, state.gate)  # each installation's, on the clone's model
             for state in _call_states(clone)}
    patches = _rebuilt_patches(clone, calls)
    if patches is None:
        return  # every patch as it was: the call state refuses to run them on this model
    clone.object_patches.update(patches)
    for found in wrappers.values():  # the clone's own lists (clone() copies them)
        found[:] = [calls[id(w.__self__)].diffusion_wrapper if id(getattr(w, "__self__", None)) in calls else w
                    for w in found]


def can_follow(patcher: Any) -> bool:
    """Whether :func:`rebind` would carry every forward patch on ``patcher`` onto another model object. Tried on its own
    modules (what is built is dropped), so a caller can tell before ComfyUI loads the other (the model file again)."""
    return _rebuilt_patches(patcher, {id(state): state for state in _call_states(patcher)}) is not None


def _rebuilt_patches(clone: Any, calls: dict[int, CallState]) -> dict[str, Any] | None:
    """Each forward patch on ``clone`` built again on its own modules; None where one cannot be."""
    try:
        return {key: _rebuilt(patch, clone, key, calls) for key, patch in clone.object_patches.items()
                if _is_forward(key)}
    except _Unfollowed:
        return None


def _call_states(patcher: Any) -> list[CallState]:
    """The call state of each erasure-LoRA installation on ``patcher``, read off its DIFFUSION_MODEL wrappers."""
    from comfy.patcher_extension import WrappersMP

    found = patcher.wrappers.get(WrappersMP.DIFFUSION_MODEL, {}).values()
    return [state for wrappers in found for w in wrappers if (state := call_state_of(w)) is not None]


def _is_forward(key: str) -> bool:
    """An object patch on a module's forward: bound to the source's module, so moved or refused."""
    return key.startswith("diffusion_model.") and key.endswith(".forward")


def _rebuilt(patch: Any, clone: Any, key: str, calls: dict[int, CallState]) -> Any:
    module = clone.get_model_object(key.removesuffix(".forward"))
    if isinstance(patch, GatedForward):
        return _chain(patch, module)
    if isinstance(patch, SharedRowsForward):
        return SharedRowsForward(_own(patch.inner, module), _groups(patch.groups, calls))
    raise _Unfollowed(patch)  # another extension's, on top of ours or elsewhere: it would run the old module


def _chain(newest: GatedForward, host: Any) -> GatedForward:
    """An erasure-LoRA chain on one qkv again, bottom up, on ``host``: the same adapters, slices and gates."""
    chain = list(erasure_chain(newest))
    forward: Callable = _own(chain[-1].base_layer._previous, host)
    for lora in reversed(chain):
        again = GatedLoRALinear(PreviousForward(host, forward), lora.slices, lora.gate, lora.scope)
        again.adapters = lora.adapters
        forward = GatedForward(again)
    return forward


def _own(forward: Callable, host: Any) -> Callable:
    """``host``'s own forward where ``forward`` was the old module's own; anything else cannot be followed.

    Its class's, not what the instance holds: a model object ComfyUI reuses (the cached non-dynamic delegate) may
    still carry the last run's patches on its modules, and a chain built on those would run the LoRA twice."""
    old = getattr(forward, "__self__", None)
    # The old model's module of the host's class: another object's bound method (an extension's wrapper) is its
    # object's own forward too, and was taken for the module's, dropping that patch on the rebuilt model.
    if type(old) is not type(host) or not own_forward(forward, old):  # another extension's patch: not ours to move
        raise _Unfollowed(forward)
    return types.MethodType(type(host).forward, host)


def _groups(groups: Callable, calls: dict[int, CallState]) -> Callable:
    """The refiners' row groups from the clone's call state that replaces the one they were read from."""
    state = getattr(groups, "__self__", None)
    if id(state) not in calls:
        raise _Unfollowed(groups)
    return calls[id(state)].current_row_groups
