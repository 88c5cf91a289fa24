"""Per-word attention maps over the picture (paper Fig. 2): where image tokens attend to each word.

A backend provides ``attention_maps(x, sigma, prompt, columns, layers)`` for one noised latent;
:func:`word_maps` averages it over noise levels, noising the same clean latent with the same
seed at each level, so maps of two models (original and erased) are directly comparable.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .attention_mass import attention_with_mass
from .prompts import EncodedPrompt


class WordMapRecorder:
    """Sums, per word, the mass every query puts on that word's columns, over the chosen layers."""

    def __init__(self, indicators: list[torch.Tensor], layers: set[int] | None):
        self.indicators, self.layers = indicators, layers  # each indicator (1, L)
        self.sums = [torch.zeros(ind.shape[1]) for ind in indicators]
        self.seen: set[int] = set()

    def wants(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def attend(self, layer: int, attention, q, k, v, scale=None, attn_mask=None) -> torch.Tensor:
        """This layer's attention output; every word's mass comes from the same call."""
        self.seen.add(layer)
        columns = torch.cat(self.indicators).to(q.device)[:, None].expand(-1, q.shape[0], -1)  # (N, B, L)
        out, mass = attention_with_mass(attention, q, k, v, columns, scale)  # mass (N, B, H, L)
        for n in range(len(self.sums)):
            self.sums[n] += mass[n, 0].mean(dim=0).cpu()
        return out

    def per_query(self) -> torch.Tensor:
        """(n_words, L) mean over recorded layers."""
        return torch.stack(self.sums) / max(1, len(self.seen))


@torch.no_grad()
def word_maps(backend, prompt: EncodedPrompt, columns: list[list[int]], x0: torch.Tensor,
              sigmas: Sequence[float], seed: int, layers: set[int] | None = None, lora: bool = True) -> torch.Tensor:
    """(n_words, h, w) maps averaged over noise levels; x_σ = σ·ε + (1 − σ)·x0 from one seeded ε."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    total = None
    for s in sigmas:
        x = s * noise + (1.0 - s) * x0
        maps = backend.attention_maps(x, torch.tensor([float(s)]), prompt, columns, layers, lora=lora)
        total = maps if total is None else total + maps
    return total / len(sigmas)
