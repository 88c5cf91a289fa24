"""Sampling the bare toy transformer with classifier-free guidance (evaluation and inference only).

Flow convention (as Z-Image): x_sigma = sigma * eps + (1 - sigma) * x0, sigma = 1 is pure noise,
velocity v = eps - x0, and the transformer's raw output is -v.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..sampling import flow_sigmas, guide, integrate
from .model import DiTConfig, predict, to_image


@dataclass(frozen=True)
class SamplerConfig:
    """The one default way to sample the toy; stored in the weights' metadata."""

    steps: int = 20
    shift: float = 1.0  # sigma' = shift*s / (1 + (shift-1)*s); 32x32 images need no high-noise bias
    cfg: float = 3.0  # guidance scale; 1.0 means no guidance (and skips the unconditional pass)
    negative_prompt: str = ""

    def __post_init__(self):
        if self.steps < 1 or self.shift <= 0 or self.cfg < 0:
            raise ValueError(f"SamplerConfig: need steps >= 1, shift > 0, cfg >= 0, got {self}")

    def sigmas(self) -> torch.Tensor:
        """steps + 1 noise levels from 1 down to 0 (the engine's shifted schedule)."""
        return flow_sigmas(self.steps, self.shift)

    def metadata(self) -> dict[str, str]:
        return {"sampler": repr(asdict(self))}


@torch.no_grad()
def euler_sample(
    transformer,
    encoder,
    dit: DiTConfig,
    prompts: Sequence[str],
    seed: int,
    sampler: SamplerConfig = SamplerConfig(),
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for ``prompts``; the same seed gives the same images."""
    n = len(prompts)
    guided = sampler.cfg != 1.0
    texts = list(prompts) + ([sampler.negative_prompt] * n if guided else [])
    caps = [e.features.to(device, dtype) for e in encoder.encode(texts)]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *dit.latent_shape), generator=gen).to(device, dtype)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        xin = torch.cat([x, x]) if guided else x
        s = torch.full((len(xin),), sigma, device=device, dtype=dtype)
        v = -predict(transformer, xin, s, caps, dit.patch_size)  # the bare transformer: no backend, no LoRA gate
        return guide(*v.chunk(2), sampler.cfg) if guided else v

    return to_image(integrate(velocity, x, sampler.sigmas().tolist()).float(), dit)
