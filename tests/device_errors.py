"""Running out of memory as each device's allocator says it (the messages torch raises), for tests to simulate."""

from __future__ import annotations

import torch

OUT_OF_MEMORY = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"),
    # MPS and the CPU raise a plain RuntimeError
    "mps": lambda: RuntimeError(
        "MPS backend out of memory (MPS allocated: 8.00 GiB, other allocations: 1.02 GiB, max allowed: 9.07 GiB). "
        "Tried to allocate 2.00 GiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit "
        "for memory allocations (may cause system failure). (simulated)"),
    "cpu": lambda: RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
        "2147483648 bytes. Error code 12 (Cannot allocate memory) (simulated)"),
}
DEVICES = sorted(OUT_OF_MEMORY)
