"""Shared fixtures: tiny real-architecture models built in process, no downloads."""

from __future__ import annotations

import pytest
import torch

from zerase_core.tiny import TinyZImageConfig, tiny_zimage_backend

# Tiny models: one thread is fastest, and immune to OpenMP oversubscription when the machine is busy
# (two threads made each small op ~25× slower while another process held a core).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same numbers from torch's global RNG whatever ran before it (order-independent)."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_backend():
    """A fresh tiny diffusers Z-Image (2 main layers, dim 64) with a hashing word encoder."""
    return tiny_zimage_backend(TinyZImageConfig(), seed=0)
