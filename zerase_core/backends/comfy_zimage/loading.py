"""Loading a ComfyUI MODEL for training: whole, on a non-dynamic twin under dynamic VRAM, with weights autograd
can use, inside a session that leaves inference mode."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ...errors import ZEraseError
from ...out_of_memory import told_as_out_of_memory
from ...scoped import scoped
from .rebuilt_model import can_follow

if TYPE_CHECKING:
    from .backend import ComfyZImageBackend

log = logging.getLogger(__name__)

PATCHES_LEFT_BEHIND = (
    "ComfyUI runs with dynamic VRAM, under which training needs a copy of the model loaded from its file again, and "
    "another extension patched the forward of one of this MODEL's modules: that patch is bound to this copy and "
    "cannot be carried onto the other (erasure LoRAs are). Put that extension's node after Z-Erase Train, or start "
    "ComfyUI with --disable-dynamic-vram."
)
DYNAMIC_WITHOUT_FILE = (
    "ComfyUI runs with dynamic VRAM, under which training needs a copy of the model loaded from its file again, and "
    "this MODEL has none. Load it with Load Diffusion Model, or start ComfyUI with --disable-dynamic-vram."
)
TOO_LITTLE_VRAM = (
    "Training needs the whole Z-Image on the GPU (~12 GB in bf16, ~6 GB with weight_dtype fp8_e4m3fn) plus its "
    "activations (~2 GB at 512² with gradient_checkpointing). Free VRAM (close other programs, unload models), "
    "load the model in fp8, lower the resolution, or start ComfyUI without --novram."
)


def training_model(model: Any, node: str) -> Any:
    """The MODEL to train on: ``model`` itself, or under ComfyUI's dynamic VRAM (its default on NVIDIA) its
    non-dynamic twin.

    Dynamic VRAM pages weights in per op, falls back to cast buffers that later ops reuse when VRAM runs
    short, and keeps per-op casts made while sampling (inference tensors). Backward needs every weight a
    forward saved, unchanged. ComfyUI itself turns to the non-dynamic model where a feature needs fixed
    weights (torch.compile, hooked conditioning); the twin is loaded from the model's file again for this run
    and released with it. Erasure LoRAs applied before come along: cloning onto another model object runs
    rebuilt_model.rebind, which builds them again on the twin's modules (the same adapters), so the run trains on
    top of them as it does without dynamic VRAM.
    """
    if not getattr(model, "is_dynamic", lambda: False)():
        return model
    if getattr(model, "cached_patcher_init", None) is None:  # built in memory: no file to load the twin from
        raise ZEraseError(f"{node}: {DYNAMIC_WITHOUT_FILE}")
    if not can_follow(model):  # before the twin is loaded: the whole model file again
        raise ZEraseError(f"{node}: {PATCHES_LEFT_BEHIND}")
    log.info("%s: training on a non-dynamic copy of the model (ComfyUI's dynamic VRAM pages weights per op)", node)
    return model.clone(disable_dynamic=True)


def uncompiled(patcher: Any, node: str) -> None:
    """Take TorchCompileModel's wrapper off a training clone: dynamo traced the run's own hooks and failed
    ("already tracked for mutation"), and its graphs are built for sampling, not for a backward through the gated
    layers. The model computes the same without it; samplers given the input MODEL still run it compiled."""
    from comfy.patcher_extension import WrappersMP
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY

    if patcher.get_wrappers(WrappersMP.APPLY_MODEL, COMPILE_KEY):
        log.info("%s: training runs the model uncompiled (TorchCompileModel's wrapper is left out of the run)", node)
        patcher.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, COMPILE_KEY)


def load_whole(patcher: Any, node: str) -> None:
    """Load ``patcher`` whole onto its device with every other model moved out first, or say what to do.

    Backward reads the weights each forward saved. A partial (low-VRAM) load casts the weights it left behind
    into cast buffers that every layer reuses, so by backward a saved weight may be another layer's: autograd
    refuses it, or, under checkpointing's recomputation, silently takes it. As ComfyUI's own LoRA trainer
    does, training therefore loads the whole model, and refuses where ComfyUI still loads it in part (--novram).
    """
    import comfy.model_management as mm

    try:
        # memory_required beyond any card: every other model leaves the GPU first (the text encoder, ~8 GB, is
        # done), so the activations and the x_t pool get the room; ComfyUI's trainer loads the same way.
        with told_as_out_of_memory():
            mm.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
    except torch.OutOfMemoryError as err:
        raise ZEraseError(f"{node}: {TOO_LITTLE_VRAM} ({err})") from err
    if getattr(patcher.model, "model_lowvram", False):
        raise ZEraseError(f"{node}: ComfyUI loaded the model only in part (low-VRAM mode). {TOO_LITTLE_VRAM}")


def own_weights(dit: nn.Module, frozen: list[nn.Parameter]) -> None:
    """Weights autograd can use, after each load of a training session.

    ComfyUI runs nodes under ``torch.inference_mode()``, so weights loaded there are inference
    tensors, which autograd cannot save for backward. Each is replaced, one at a time, by a plain
    copy that stays (as ComfyUI's own ops do when they move such weights): the original is freed at
    once, so the weights never sit in memory twice, and nothing stale is put back over what ComfyUI
    may change meanwhile. Plain parameters (a model built outside inference mode) are frozen for the
    session (into ``frozen``) and given back after it: otherwise backward would compute and keep a
    gradient for every base weight (and fail on fp8 ones).
    """
    with torch.no_grad():
        for module in dit.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_inference():
                    module._parameters[name] = nn.Parameter(param.clone(), requires_grad=False)
                elif param is not None and param.requires_grad:
                    frozen.append(param.requires_grad_(False))
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_inference():
                    module._buffers[name] = buf.clone()


def loaded_whole(patcher: Any) -> bool:
    """``patcher`` is ComfyUI's loaded model, whole, with its weight and object patches in place."""
    import comfy.model_management as mm
    from comfy.utils import get_attr

    model = patcher.model
    return (any(m is patcher for m in mm.loaded_models()) and not model.model_lowvram
            and patcher.loaded_size() >= patcher.model_size()
            and model.current_weight_patches_uuid == patcher.patches_uuid
            and patcher.object_patches_backup.keys() == patcher.object_patches.keys()  # none applied or left over
            and all(get_attr(model, k) is v for k, v in patcher.object_patches.items()))


@contextmanager
def training_session(backend: "ComfyZImageBackend") -> Iterator[None]:
    """Leave inference mode and set ComfyUI's training flag; while inside, the backend loads the model whole,
    with weights autograd can use (see ``ComfyZImageBackend.load``), and its attention runs on ComfyUI's SDPA (see
    ``attention.recording_override``). The first load comes with the first forward,
    after the prompts are encoded, so the text encoder makes room for it and the model is not loaded whole twice."""
    import comfy.model_management as mm

    with torch.inference_mode(False), scoped(backend, _whole=True, _weights_owned=False, _frozen=[]), \
            scoped(backend.calls, training=True), scoped(mm, in_training=True):
        try:
            yield
        finally:
            for param in backend._frozen:
                param.requires_grad_(True)
            mm.soft_empty_cache()
