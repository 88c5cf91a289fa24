"""How many main layers a Z-Erase step must checkpoint to fit the memory free: the decision ``"auto"`` makes before
the first step. As few as fit, since each one checkpointed costs its forward again in backward.

Running out of memory once would tell as well, and stays the backstop on CUDA (trainer.py), but it cannot be the only
sign: on Windows NVIDIA's driver (536.40 and later, by default) moves what does not fit into shared system memory
instead of failing, so a step too large for the card runs many times slower and never raises; Apple's unified
memory (MPS) and a CPU run swap, or the system stops the process. So the step's activations are estimated from what
the real model was measured to hold, and compared with the memory free on the device.
"""

from __future__ import annotations

from typing import NamedTuple

import psutil
import torch

from .layout import pad_to_multiple

# Measured on an H200 (docs/bench/gpu_h200_3670d48.json): the batch-3 student forward/backward of a Z-Erase step
# ([c_er, ∅, c_pr]) at 512² without checkpointing held 21.91 GiB above the weights, on the real Z-Image (30 main
# layers of width 3840, bf16) with 1024 image and 64 caption tokens. Activations grow linearly with rows, tokens,
# layers, width and the activations' dtype (no L×L attention maps are kept), so that figure scales to any of them.
MEASURED = {"bytes": 21.91 * 2**30, "rows": 3, "tokens": 1024 + 64, "layers": 30, "dim": 3840, "itemsize": 2}
# The measured peak already holds the LoRA's gradients and the loss's buffers (AdamW's state was resident); the
# margin is for the allocator, whose reserved blocks run some 5-15 % above what is allocated (an assumption, not
# measured here). At 512² in bf16 it leaves a 40 GB card (27.4 GiB free with the weights loaded) the faster run.
MARGIN = 1.15
PAD = 32  # both Z-Image implementations pad the image and the caption sequences to a multiple of 32 tokens


def _tokens(image_tokens: int, caption_tokens: int) -> int:
    return pad_to_multiple(image_tokens, PAD) + pad_to_multiple(caption_tokens, PAD)


def step_bytes(image_tokens: int, caption_tokens: int, rows: int, layers: int, dim: int,
               itemsize: int = MEASURED["itemsize"]) -> float:
    """Activation bytes a step without checkpointing holds for backward, scaled from :data:`MEASURED` (the
    sequences counted as padded; ``itemsize``: bytes per activation, 4 where the model computes in fp32)."""
    m = MEASURED
    tokens = _tokens(image_tokens, caption_tokens)
    scale = rows / m["rows"] * tokens / m["tokens"] * layers / m["layers"] * dim / m["dim"] * itemsize / m["itemsize"]
    return m["bytes"] * scale


def layer_input_bytes(image_tokens: int, caption_tokens: int, rows: int, dim: int,
                      itemsize: int = MEASURED["itemsize"]) -> float:
    """What a checkpointed layer keeps for backward: its input, the (rows, tokens, dim) hidden states."""
    return rows * _tokens(image_tokens, caption_tokens) * dim * itemsize


def peak_bytes(layers: int, checkpointed: int, per_layer: float, kept: float) -> float:
    """A step's activations at their peak when the first ``checkpointed`` of ``layers`` main layers are recomputed:
    ``per_layer`` bytes held by each other layer, ``kept`` by each checkpointed one."""
    end_of_forward = (layers - checkpointed) * per_layer + checkpointed * kept
    # Backward recomputes a checkpointed layer after every later layer's activations are freed: one layer's again.
    recomputing = per_layer + checkpointed * kept if checkpointed else 0.0
    return max(end_of_forward, recomputing)


def most_checkpointed(layers: int) -> int:
    """The most main layers worth checkpointing: all but the last. Backward begins with the last layer, so
    recomputing it rebuilds its activations at once, where they would have been held anyway: it saves no memory
    (:func:`peak_bytes`: one layer input more) and costs its forward again. Measured, the same peak for the last two
    counts: 29 and 30 of 30 layers at 512² on an H200, 1673.1 and 1673.2 MiB, 0.416 and 0.450 s per step
    (docs/bench/gpu_h200_partial_42e1a44.json); 3 and 4 of 4 on the CPU (tests/test_memory_fit.py)."""
    return max(layers - 1, 0)


def layers_to_checkpoint(layers: int, per_layer: float, kept: float, available: int | None) -> int:
    """The fewest main layers to checkpoint for the step to fit ``available`` bytes with :data:`MARGIN` to spare:
    0 where everything fits or the memory free is not known; the most worth it (:func:`most_checkpointed`), as
    ``"on"`` checkpoints, where nothing fits."""
    most = most_checkpointed(layers)
    for checkpointed in range(most + 1):
        if fits(peak_bytes(layers, checkpointed, per_layer, kept), available):
            return checkpointed
    return most


class Plan(NamedTuple):
    """auto's decision: the main layers to checkpoint; the bytes a step's activations take without checkpointing,
    and at their peak as planned (more than the memory free where nothing fits)."""

    checkpointed: int
    needed: float
    peak: float


def plan(image_tokens: int, caption_tokens: int, rows: int, layers: int, dim: int, casts: float,
         available: int | None, itemsize: int = MEASURED["itemsize"]) -> Plan:
    """auto's decision for a step of ``rows`` predictions. ``casts``: bytes of the compute-dtype weight copies a
    forward keeps for backward (fp8 weights), spread over the main layers like their activations; ``itemsize``: bytes
    per activation."""
    needed = step_bytes(image_tokens, caption_tokens, rows, layers, dim, itemsize) + casts
    kept = layer_input_bytes(image_tokens, caption_tokens, rows, dim, itemsize)
    checkpointed = layers_to_checkpoint(layers, needed / layers, kept, available)
    return Plan(checkpointed, needed, peak_bytes(layers, checkpointed, needed / layers, kept))


def available_bytes(device: torch.device) -> int | None:
    """Memory this process can still take for a step on ``device``. CUDA: free on the card plus what torch holds
    unused. Apple's MPS (memory shared with the system): Metal's recommended working set less what it has allocated;
    past it macOS swaps. CPU: the system memory available (psutil). None for other devices: not known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):  # torch ≥ 2.5
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None


def fits(needed: float, available: int | None) -> bool:
    return available is None or needed * MARGIN <= available
