"""Flow-matching Euler sampling in the engine's convention (v = ε − x0, σ: 1 → 0).

Used for the ESD-style x_t of training (paper §4.1: x_t reached from noise with the erase
prompt) and for previews. Z-Image Turbo samples with a shifted schedule (shift 3).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .backends.base import Backend
from .prompts import EncodedPrompt
from .seeds import offset_seed

if TYPE_CHECKING:
    from .config import TrainConfig

# Preview noise is a stream of its own: seeded like the run, it would be the first x_t trajectory trained on,
# and an "after" picture of a training point would overstate how the erasure generalises.
PREVIEW_SEED_OFFSET = 1_000_003


def preview_seed(seed: int) -> int:
    """The seed of a run's preview noise, from the run's seed."""
    return offset_seed(seed, PREVIEW_SEED_OFFSET)


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """(steps + 1,) σ from 1 to 0, time-shifted: σ' = shift·σ / (1 + (shift − 1)·σ)."""
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1.0 + (shift - 1.0) * s)


Velocity = Callable[[torch.Tensor, float], torch.Tensor]  # (x, σ) -> v


def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Classifier-free guidance: v_∅ + cfg (v_c − v_∅)."""
    return v_uncond + cfg * (v_cond - v_uncond)


def integrate(velocity: Velocity, x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Euler steps of dx/dσ = v from sigmas[0] to sigmas[-1]."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * velocity(x, s)
    return x


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
    """A backend's predictions integrated from sigmas[0] to sigmas[-1]; CFG when ``uncond`` and cfg ≠ 1."""
    guided = uncond is not None and cfg != 1.0

    def velocity(x: torch.Tensor, s: float) -> torch.Tensor:
        sigma = torch.full((x.shape[0],), s)
        if not guided:
            return backend.velocity(x, sigma, prompts, lora=lora)[0].to(x.device)
        both, _ = backend.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), [*prompts, *uncond], lora=lora)
        return guide(*both.chunk(2), cfg).to(x.device)

    return integrate(velocity, x.float(), sigmas.tolist())


def before_after(backend: Backend, prompt: EncodedPrompt, config: "TrainConfig") -> tuple[torch.Tensor, torch.Tensor]:
    """x0 of ``prompt`` without and with the LoRA, from one noise, on the run's sampler (for previews)."""
    gen = torch.Generator().manual_seed(preview_seed(config.seed))
    noise = torch.randn((1, *backend.latent_shape(config.height, config.width)), generator=gen)
    sigmas = flow_sigmas(config.sample_steps, config.shift)
    before, after = (euler(backend, noise, sigmas, [prompt], lora=lora).cpu() for lora in (False, True))
    return before, after
