"""Running out of memory as torch's allocators say it, for tests to simulate: one place for the messages."""

from __future__ import annotations

import torch

# CUDA raises torch.OutOfMemoryError; MPS and the CPU a plain RuntimeError with these words (torch's MPSAllocator.mm
# and c10/core/impl/alloc_cpu.cpp: "can't allocate memory" on Linux and macOS, "not enough memory" on Windows).
MESSAGES = {
    "cuda": "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)",
    "mps": "MPS backend out of memory (MPS allocated: 8.00 GiB, other allocations: 1.02 GiB, max allowed: 9.07 GiB). "
           "Tried to allocate 2.00 GiB on private pool. (simulated)",
    "cpu": "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried to allocate "
           "2147483648 bytes. Error code 12 (Cannot allocate memory) (simulated)",
    "cpu-windows": "[enforce fail at alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough memory: you tried to "
                   "allocate 2147483648 bytes. (simulated)",
    "cublas": "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` (simulated)",
}
# Words that must not be taken for the device's: a bare "out of memory" names more than that.
NOT_OUT_OF_MEMORY = ("out of memory slots in the queue", "mat1 and mat2 shapes cannot be multiplied")
# The integration tests run CUDA's exception and one plain RuntimeError; the words are tested one by one.
DEVICES = ("cuda", "mps")


def ran_out(device: str = "cuda") -> BaseException:
    """What ``device``'s allocator raises when it runs out."""
    kind = torch.OutOfMemoryError if device == "cuda" else RuntimeError
    return kind(MESSAGES[device])
