"""Saving and loading the toy's safetensors files: atomic writes, string metadata, fp16 storage."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_DIR = Path(__file__).parent / "weights"


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str], dtype=torch.float16) -> None:
    """Write ``state`` (floats cast to ``dtype`` to keep shipped files small) atomically."""
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; shipped weights are ordinary files
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_weights(path: Path, dtype=torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, metadata
