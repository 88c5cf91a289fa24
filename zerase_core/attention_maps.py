"""Per-word attention maps over the picture (paper Fig. 2): where image tokens attend to each word.

A backend provides ``attention_maps(x, sigma, prompt, columns, layers)`` for one noised latent;
:func:`word_maps` averages it over noise levels, noising the same clean latent with the same
seed at each level, so maps of two models (original and erased) are directly comparable.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .attention_mass import Recorder, attention_with_mass
from .errors import ZEraseError
from .layout import TokenLayout, pad_to_multiple
from .prompts import EncodedPrompt


def check_request(words: Sequence[str], sigmas: Sequence[float]) -> None:
    """What a map request must hold before any model runs: a word and a noise level, each level in (0, 1]."""
    if not words or not sigmas:
        raise ZEraseError("give at least one word and one noise level.")
    if any(not 0.0 < s <= 1.0 for s in sigmas):
        raise ZEraseError(f"noise levels must lie in (0, 1]; got {list(sigmas)}.")


def layer_range(n_layers: int, start: int, end: int) -> range:
    """Main layers ``start`` … ``end`` − 1 (``end`` < 0: to the last; past the last: cut there), refused when empty."""
    stop = n_layers if end < 0 else min(end, n_layers)
    if not 0 <= start < stop:
        raise ZEraseError(f"layer range {start}..{end} is empty; the model has {n_layers} layers. Set "
                          "layer_start below layer_end (which is exclusive; -1: to the last layer).")
    return range(start, stop)


def shown_share(latent_size: Sequence[int], patch: int) -> tuple[float, float]:
    """The share of a map's height and width a latent's picture shows: the model pads the latent up to whole patches
    (ComfyUI's NextDiT), so where a side is no multiple of ``patch`` the map's last tokens reach past the picture.
    Stretched over it instead, a token was drawn up to half a patch (8 px) toward the top-left."""
    return tuple(n / pad_to_multiple(n, patch) for n in latent_size)


def check_comparable(ours: dict, theirs: dict) -> None:
    """A second model whose maps can be set beside the first's: the same architecture (``fingerprint``s), since the
    prompt is encoded once, for the first's caption width."""
    if theirs != ours:
        raise ZEraseError(f"model_b is another architecture than model ({theirs} vs {ours}); compare two "
                          "versions of one model, e.g. with and without an erasure LoRA.")


def check_latent(samples: torch.Tensor, channels: int) -> None:
    """A latent batch the maps can be drawn over: at least one image of the model's latent channels, with pixels."""
    if samples.shape[0] == 0:
        raise ZEraseError("the LATENT holds no image (batch size 0); connect one with at least one.")
    if samples.ndim != 4 or samples.shape[1] != channels or 0 in samples.shape[2:]:
        raise ZEraseError(
            f"the latent has shape {tuple(samples.shape)}; Z-Image's have {channels} channels. Make it with "
            "EmptySD3LatentImage, or encode the image with Z-Image's VAE (ae.safetensors).")
    if not torch.isfinite(samples).all():  # the maps' own check would blame the model's forward for it
        raise ZEraseError("the latent is not finite numbers (NaN or inf): the LATENT, or the IMAGE and VAE that "
                          "made it, is broken (a VAE in fp16 can overflow). Connect another, or run the VAE in bf16 "
                          "or fp32.")


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
        columns = self.indicators.to(q.device)[:, None].expand(-1, q.shape[0], -1)  # (N, B, L); made there already
        out, mass = attention_with_mass(attention, q, k, v, columns, scale, attn_mask)  # mass (N, B, H, L)
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
    if not torch.isfinite(total).all():  # drawn, NaN spoils the colour scale the other model's row shares
        raise ZEraseError("The attention is not a finite number (NaN or inf) somewhere: the model's forward "
                          "overflowed (fp16 weights, or an erasure LoRA at a high strength). Load the model in bf16 or "
                          "fp32 (weight_dtype default), or lower the strength.")
    return total / len(sigmas)
