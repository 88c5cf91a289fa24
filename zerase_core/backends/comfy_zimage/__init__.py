"""Backend for ComfyUI's Z-Image (``comfy.ldm.lumina.model.NextDiT`` with Z-Image modulation).

ComfyUI is imported lazily, inside functions: ``import zerase_core`` works without it.
Facts this relies on (ComfyUI v0.18.x, checked by running it; README, "Token layout per call"):

* the main-layer sequence is [caption | image]; the caption is padded to a multiple of
  ``pad_tokens_multiple`` (32), then the image tokens are padded the same way. The blocks
  are not told the caption length, so a DIFFUSION_MODEL wrapper derives the layout from the
  conditioning of every call and hands it to the gate;
* conditionings of different lengths are never batched together (``c_crossattn`` is a
  CONDRegular), so one call has one caption length;
* each main layer's attention has one fused ``qkv`` Linear: q, k, v stacked in that order;
* ``apply_model`` returns the denoised x0, hence v = ε − x0 = (x_σ − x0)/σ;
* attention goes through ``transformer_options["optimized_attention_override"]`` when set,
  called as ``override(func, q, k, v, heads, mask, skip_reshape=True, transformer_options=...)``
  with q, k, v of shape (B, H, L, D) for NextDiT.

The LoRA is installed on a ModelPatcher *clone* as object patches on
``diffusion_model.layers.N.attention.qkv.forward``: the module itself stays in place, so
ComfyUI's own weight patches (stock LoRAs on qkv) and low-VRAM casting keep working, and
unpatching restores the original forward. Each installation has its own gate and its own
keyed wrapper, so several erasure LoRAs applied in a row add up. A clone onto another model object
(``clone(model_override=...)``, dynamic VRAM's non-dynamic delegate) gets them built again on that object's modules
(``rebuilt_model.py``).

Gradient checkpointing is another object patch, on ``diffusion_model.layers.N.forward``: the
layer's forward runs under ``torch.utils.checkpoint`` with the per-call state (every gate's
layout, the attention capture, the call's ``transformer_options`` as they were for that
layer) captured at forward time and replayed in the recomputation during backward.
"""

from __future__ import annotations

from .backend import ComfyZImageBackend
from .clip_prompts import as_tokenized, encode_with_clip
from .loading import training_session
from .object_patches import CheckpointedForward, GatedForward
from .recognise import check_zimage

__all__ = ["CheckpointedForward", "ComfyZImageBackend", "GatedForward", "as_tokenized", "check_zimage",
           "encode_with_clip", "training_session"]
