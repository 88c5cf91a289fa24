"""Shared fixtures: tiny real-architecture models built in process, no downloads."""

from __future__ import annotations

import signal

import pytest
import torch

from zerase_core.tiny import TinyZImageConfig, tiny_zimage_backend

# Tiny models: one thread is fastest, and immune to OpenMP oversubscription when the machine is busy
# (two threads made each small op ~25× slower while another process held a core).
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_a_terminal_delivers_it():
    """The tests raise real Ctrl-Cs; a script's background job (and some CI runners) start Python with SIGINT ignored,
    where they would be lost and four tests failed on unchanged code. Python's own handler, as in a terminal; tests
    of an ignored Ctrl-C set that themselves. (Subprocesses then start with SIGINT at the system's default.)"""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same numbers from torch's global RNG whatever ran before it (order-independent)."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_backend():
    """A fresh tiny diffusers Z-Image (2 main layers, dim 64) with a hashing word encoder."""
    return tiny_zimage_backend(TinyZImageConfig(), seed=0)
