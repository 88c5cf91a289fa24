"""Putting an :class:`ErasureLoRA` onto a backend, and reading a trained one back out."""

from __future__ import annotations

import torch

from .backends.base import Backend, LoRASet
from .errors import ZEraseError
from .lora import LoRAConfig, finite_in_fp32
from .lora_file import ErasureLoRA, Key, check_fits


def host_widths(backend: Backend) -> dict[Key, tuple[int, int]]:
    """(layer, proj) -> (in_features, output width) for every projection the model can host."""
    return {
        (slot.layer, proj): (slot.in_features, end - start)
        for slot in backend.host_slots()
        for proj, (start, end) in slot.slices.items()
    }


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rank components change nothing (B A is unchanged), so factors of any rank fit one adapter."""
    extra = rank - a.shape[0]
    return torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)


def install_lora(backend: Backend, lora: ErasureLoRA, name: str = "erasure", strength: float = 1.0,
                 frozen_in: bool = True) -> LoRASet:
    """Check that ``lora`` fits, then install it gated, frozen, at the file's scale × the file's strength ×
    ``strength`` (Apply's). LoRAs installed under different ``name``s add up; a ``name`` already installed is refused.
    ``frozen_in``: it becomes part of the model θ, on also where a call switches the LoRA off (``lora=False``: a LoRA
    trained on top learns against the model as applied, as in ComfyUI); False: it is what ``lora`` switches (original
    | erased pictures of one backend).

    Built outside inference mode (ComfyUI runs nodes inside it): a LoRA trained later on top of
    this one back-propagates through it, and autograd cannot save inference tensors.
    """
    check_applicable(backend, lora)
    if not finite_in_fp32(strength):  # before LoRAConfig, whose refusal would name alpha and scale
        raise ZEraseError(f"The strength must be a finite number (it multiplies the LoRA's own scale); got "
                          f"{strength}.")
    with torch.inference_mode(False), torch.no_grad():
        return _installed(backend, lora, name, lora.strength * strength, frozen_in)


def check_applicable(backend: Backend, lora: ErasureLoRA) -> None:
    """Refuse a LoRA that ``backend``'s model cannot take: trained without the gate, or for another architecture."""
    lora.require_gated()
    check_fits(lora, backend.fingerprint(), host_widths(backend))


def check_before_loading(lora: ErasureLoRA, fingerprint: dict) -> None:
    """:func:`check_applicable` as far as a model not loaded yet can tell, by its ``fingerprint`` (read off its
    config): gated, and made for a model of these sizes. Its projections' widths are checked once it is loaded."""
    lora.require_gated()
    check_fits(lora, fingerprint, None)


def _installed(backend: Backend, lora: ErasureLoRA, name: str, strength: float, frozen_in: bool) -> LoRASet:
    layers = lora.layers
    config = LoRAConfig(
        rank=lora.rank,
        alpha=lora.scale * lora.rank,
        targets=lora.targets,
        layers=(layers[0], layers[-1] + 1),
        strength=strength,
    )
    lora_set = backend.install(config, name, replace=False)  # LoRAs applied add up: a second one must not replace
    factors = {key: _pad_rank(a, b, lora.rank) for key, (a, b) in lora.factors.items()}
    for key, (a, b) in lora_set.factors().items():  # slots the file leaves out stay at zero
        factors.setdefault(key, (a.detach().clone(), torch.zeros_like(b)))
    lora_set.load_factors(factors)
    for p in lora_set.parameters():
        p.requires_grad_(False)  # applied, not trained: no gradient is computed or kept for it
    for adapter in set(lora_set.slots.values()):
        adapter.frozen_in = frozen_in
    backend.rest(lora_set)
    return lora_set


def export_lora(lora_set: LoRASet, **describe) -> ErasureLoRA:
    """Snapshot a trained :class:`LoRASet` as an :class:`ErasureLoRA` (fp32, on CPU)."""
    factors = {k: (a.detach().float().cpu().clone(), b.detach().float().cpu().clone())
               for k, (a, b) in lora_set.factors().items()}
    config = lora_set.config
    return ErasureLoRA(factors, scale=config.scale, strength=config.strength, scope=config.scope, **describe)
