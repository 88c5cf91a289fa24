"""Shared fixtures: tiny real-architecture models built in process, no downloads."""

from __future__ import annotations

import pytest
import torch

from zerase_core.tiny import TinyZImageConfig, tiny_zimage_backend

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def tiny_backend():
    """A fresh tiny diffusers Z-Image (2 main layers, dim 64) with a hashing word encoder."""
    return tiny_zimage_backend(TinyZImageConfig(), seed=0)
