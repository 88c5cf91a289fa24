"""Per-word attention maps over the picture (paper Fig. 2): where image tokens attend to each word.

A backend provides ``attention_maps(x, sigma, prompt, columns, layers)`` for one noised latent;
:func:`word_maps` averages it over noise levels, noising the same clean latent with the same
seed at each level, so maps of two models (original and erased) are directly comparable.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .attention_mass import Recorder, attention_with_mass
from .layout import TokenLayout
from .prompts import EncodedPrompt


class WordMapRecorder(Recorder):
    """Sums, per word, the mass every query puts on that word's columns, over the chosen layers."""

    def __init__(self, indicators: list[torch.Tensor], layers: set[int] | None):
        super().__init__(layers)
        self.indicators = torch.cat(indicators)  # (N, L): each word's (1, L) indicator

    def forget(self) -> None:
        self.sums: list[torch.Tensor] | None = None  # per word, on the layers' device until per_query
        self.seen: set[int] = set()

    def attend(self, layer: int, attention, q, k, v, scale=None, attn_mask=None) -> torch.Tensor:
        """This layer's attention output; every word's mass comes from the same call."""
        columns = self.indicators.to(q.device)[:, None].expand(-1, q.shape[0], -1)  # (N, B, L)
        out, mass = attention_with_mass(attention, q, k, v, columns, scale)  # mass (N, B, H, L)
        if not self.keeps:
            return out
        self.seen.add(layer)
        if self.sums is None:
            self.sums = [mass.new_zeros(mass.shape[-1]) for _ in range(mass.shape[0])]
        for n, total in enumerate(self.sums):  # added where computed: no host sync per layer and word
            total += mass[n, 0].mean(dim=0)
        return out

    def per_query(self) -> torch.Tensor:
        """(n_words, L) mean over recorded layers."""
        if self.sums is None:
            raise RuntimeError("No attention was recorded: no main layer in the chosen range ran")
        return torch.stack(self.sums).cpu() / len(self.seen)

    def image_maps(self, layout: TokenLayout, h: int, w: int) -> torch.Tensor:
        """(n_words, h, w): the per-query maps of the one sample's image tokens (row-major), padding left out."""
        (start, _), = layout.image
        return self.per_query()[:, start : start + h * w].reshape(-1, h, w)


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
