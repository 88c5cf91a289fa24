"""What the backend patches onto a ModelPatcher clone: the gated LoRA on each ``qkv.forward``, checkpointing on
each main layer's ``forward``. Object patches leave the modules in place, so ComfyUI's own weight patches and
casting keep working, and unpatching restores the original forwards."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from ...lora import GatedLoRALinear
from ...replay_checkpoint import replayed_checkpoint

if TYPE_CHECKING:
    from .call_state import CallState

QKV_PATH = "diffusion_model.layers.{}.attention.qkv"
LAYER_FORWARD = "diffusion_model.layers.{}.forward"
REFINER_FORWARD = "diffusion_model.noise_refiner.{}.forward"
OFFLOAD_KEY = "zerase_offload"


class PreviousForward(nn.Module):
    """Stands in for the host Linear inside :class:`GatedLoRALinear`: calls the forward that was
    in place before this installation (the stock Linear's, or an earlier erasure LoRA's)."""

    def __init__(self, host: nn.Module, previous: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "_host", host)  # not a submodule: ComfyUI owns it
        object.__setattr__(self, "_previous", previous)
        self.in_features, self.out_features = host.in_features, host.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self._host.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._previous(x)


class GatedForward:
    """The object patched onto ``qkv.forward``: a plain callable (an nn.Module there would be
    registered as a submodule instead of overriding ``forward``)."""

    def __init__(self, lora: GatedLoRALinear):
        self.lora = lora

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)  # which brings its adapters to x's device (GatedLoRALinear._follow)


def erasure_chain(forward: Any) -> Iterator[GatedLoRALinear]:
    """The gated layers of an erasure-LoRA chain on one qkv, newest first (this installation's and earlier ones')."""
    while isinstance(forward, GatedForward):
        yield forward.lora
        forward = getattr(forward.lora.base_layer, "_previous", None)


def offload_adapters(patcher: Any, unpatch_all: bool = True) -> None:
    """ON_DETACH: applied erasure LoRAs leave the GPU with the model. They sit in object patches, outside the module
    tree ComfyUI moves and outside its memory accounting; the gated layer brings them back at the next call. A LoRA
    being trained stays where it is, beside its optimizer state."""
    if not unpatch_all:  # ComfyUI keeps the weights where they are too
        return
    with torch.inference_mode(False):  # moved inside a node's run, they would become inference tensors
        for patch in patcher.object_patches.values():
            for lora in erasure_chain(patch):
                if not any(p.requires_grad for p in lora.adapters.parameters()):
                    lora.adapters.to(patcher.offload_device)


def own_forward(forward: Any, module: nn.Module) -> bool:
    """Whether ``forward`` is ``module``'s own bound forward: what runs with no object patch in place."""
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward


class CheckpointedForward:
    """The object patched onto a main layer's ``forward``: the previous forward under
    ``torch.utils.checkpoint`` (non-reentrant).

    The recomputation runs during backward, after the DIFFUSION_MODEL wrappers and the
    attention capture have exited, and after NextDiT has moved ``transformer_options
    ["block_index"]`` on. So the state the first run saw is taken when the layer runs and
    replayed around both runs: every gate's layout and LoRA switch, the call's recorder and
    layout (:class:`~.call_state.CallState`), and a copy of ``transformer_options`` (the attention
    override in it reads ``block_index`` and the CallState). The recomputed graph is then the first.
    """

    def __init__(self, calls: "CallState", layer: int, previous: Callable[..., torch.Tensor]):
        self.calls, self.layer, self.previous = calls, layer, previous

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # sampling, teacher passes: nothing to save
            return self.previous(*args, **kwargs)
        options = kwargs.get("transformer_options")
        if options is not None:
            kwargs["transformer_options"] = dict(options)  # this layer's block_index, kept
        state = self.calls.layer_state(self.layer)
        return replayed_checkpoint(self.previous, lambda: self.calls.replaying(state), *args, **kwargs)
