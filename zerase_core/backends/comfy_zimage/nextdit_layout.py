"""Where caption and image tokens sit in NextDiT's main-layer sequence: [caption | image] (README, "Token layout
per call")."""

from __future__ import annotations

import math

import torch

from ...layout import TokenLayout, pad_to_multiple


def image_patches(x: torch.Tensor, patch: int) -> tuple[int, int]:
    """Image tokens down and across: NextDiT pads the latent up to a multiple of the patch size."""
    return math.ceil(x.shape[-2] / patch), math.ceil(x.shape[-1] / patch)


def nextdit_layout(context_len: int, x: torch.Tensor, patch: int, multiple: int) -> TokenLayout:
    """[caption | image], each padded to ``multiple`` (NextDiT.patchify_and_embed)."""
    text = pad_to_multiple(context_len, multiple)
    h, w = image_patches(x, patch)
    image = pad_to_multiple(h * w, multiple)
    b = x.shape[0]
    return TokenLayout.of(text + image, ((0, text),) * b, ((text, text + image),) * b, (h * w,) * b)
