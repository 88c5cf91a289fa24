"""Load a diffusers Z-Image folder (transformer/, text_encoder/, tokenizer/) as a backend.

The text encoder (Qwen3, ~8 GB in bf16) is only needed to encode the run's prompts; the
trainer encodes them all up front, so it can be dropped right after (see ``release_encoder``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ZEraseError
from .diffusers_zimage import DiffusersZImageBackend, LatentSpec
from .text_encoders import ChatTemplateEncoder


def load_diffusers_zimage(folder: Path, device: str | None = None, dtype: torch.dtype = torch.bfloat16):
    from diffusers import ZImageTransformer2DModel
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    missing = [s for s in ("transformer", "text_encoder", "tokenizer") if not (folder / s).is_dir()]
    if missing:
        raise ZEraseError(f"{folder} is not a diffusers Z-Image folder: missing {', '.join(missing)}/.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        dtype = torch.float32  # bf16 matmuls on CPU are slow and gain nothing here
    transformer = ZImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    text_model = AutoModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).to(device)
    encoder = ChatTemplateEncoder(tokenizer, text_model.eval())
    return DiffusersZImageBackend(transformer.eval(), encoder, LatentSpec(channels=transformer.config.in_channels))
