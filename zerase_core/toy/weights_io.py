"""Saving and loading the toy's safetensors files: atomic writes, string metadata, fp16 storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..files import atomic_save, decode_metadata

WEIGHTS_DIR = Path(__file__).parent / "weights"


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, Any],
                 dtype=torch.float16) -> None:
    """Write ``state`` (floats cast to ``dtype`` to keep shipped files small) atomically; ``metadata`` as
    :func:`~zerase_core.files.atomic_save` stores it; :func:`load_weights` returns every value as text."""
    atomic_save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, path, metadata)


def load_weights(path: Path, dtype=torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        # Each value as text: a quoted string unquoted ("1" as atomic_save stores a str "1"), anything else as stored.
        raw = f.metadata() or {}
        metadata = {k: v if isinstance(v, str) else raw[k] for k, v in decode_metadata(raw).items()}
        state = {k: f.get_tensor(k) for k in f.keys()}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, metadata
