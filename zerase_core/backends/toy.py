"""The built-in toy model as an engine backend: it *is* a diffusers Z-Image, so the diffusers
backend serves it; only the latent (pixel-unshuffled RGB, no VAE) and the encoder differ."""

from __future__ import annotations

from .diffusers_zimage import DiffusersZImageBackend, LatentSpec


def toy_backend(bundle) -> DiffusersZImageBackend:
    """Backend over a :class:`zerase_core.toy.ToyBundle` (``load_toy()``)."""
    channels = bundle.latent_shape[0]
    return DiffusersZImageBackend(
        bundle.transformer, bundle.encoder, LatentSpec(channels, bundle.dit_config.unshuffle), family="toy-shapes"
    )
