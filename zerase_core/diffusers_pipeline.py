"""Erasure LoRAs in a plain diffusers ``ZImagePipeline``: after :func:`apply_erasure`, ``pipe(prompt)`` samples the
erased model (the command line trains on a diffusers folder; this is how its LoRA is used there).

    pipe = ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", torch_dtype=torch.bfloat16).to("cuda")
    backend = apply_erasure(pipe, "out/train/erasure_lora.safetensors")
    image = pipe("a starry night", num_inference_steps=8, guidance_scale=0.0).images[0]
    backend.uninstall()  # the original model again

The gate needs each call's token layout; the backend reads it off the call's own inputs (``_LaidOutCalls``).
"""

from __future__ import annotations

import os
from typing import Any

from .apply import install_lora
from .backends.diffusers_zimage import (LAYER_BY_LAYER_OFFLOAD, DiffusersZImageBackend, LatentSpec,
                                        offloaded_layer_by_layer, owner)
from .errors import ZEraseError
from .lora_file import ErasureLoRA, load_lora


def apply_erasure(pipe: Any, lora: ErasureLoRA | str | os.PathLike, strength: float = 1.0,
                  name: str = "erasure") -> DiffusersZImageBackend:
    """Install ``lora`` (a file or a loaded one) on ``pipe``'s transformer at ``strength``, under ``name`` (LoRAs
    applied under different names add up, as Apply Erasure LoRA's do). Returns the backend that owns the transformer:
    its ``uninstall()`` takes every erasure LoRA off."""
    lora = load_lora(lora) if isinstance(lora, (str, os.PathLike)) else lora
    transformer = pipe.transformer
    if offloaded_layer_by_layer(transformer):
        raise ZEraseError(LAYER_BY_LAYER_OFFLOAD)
    # The pipeline encodes its own prompts: a backend made here has no text encoder.
    backend = owner(transformer) or DiffusersZImageBackend(transformer, None,
                                                           LatentSpec(transformer.config.in_channels))
    install_lora(backend, lora, name=name, strength=strength)
    return backend

