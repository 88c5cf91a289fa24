"""Flow-matching Euler sampling in the engine's convention (v = ε − x0, σ: 1 → 0).

Used for the ESD-style x_t of training (paper §4.1: x_t reached from noise with the erase
prompt) and for previews. Z-Image Turbo samples with a shifted schedule (shift 3).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .backends.base import Backend
from .prompts import EncodedPrompt


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """(steps + 1,) σ from 1 to 0, time-shifted: σ' = shift·σ / (1 + (shift − 1)·σ)."""
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1.0 + (shift - 1.0) * s)


@torch.no_grad()
def euler(
    backend: Backend,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    prompts: Sequence[EncodedPrompt],
    *,
    uncond: Sequence[EncodedPrompt] | None = None,
    cfg: float = 1.0,
    lora: bool = False,
) -> torch.Tensor:
    """Integrate dx/dσ = v from sigmas[0] to sigmas[-1]; CFG when ``uncond`` and cfg ≠ 1."""
    x = x.float()
    guided = uncond is not None and cfg != 1.0
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sigma = torch.full((x.shape[0],), float(s))
        if guided:
            both, _ = backend.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), [*prompts, *uncond], lora=lora)
            v_c, v_u = both.chunk(2)
            v = v_u + cfg * (v_c - v_u)
        else:
            v, _ = backend.velocity(x, sigma, prompts, lora=lora)
        x = x + (float(s_next) - float(s)) * v.to(x.device)
    return x
