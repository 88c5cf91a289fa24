"""A tiny, randomly initialised diffusers Z-Image for tests, the CLI's ``--tiny`` and benchmarks.

Real architecture (context refiner, noise refiner, joint main layers), toy sizes, no weights
to download. Deterministic by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends.diffusers_zimage import DiffusersZImageBackend, LatentSpec
from .backends.text_encoders import HashWordEncoder


@dataclass(frozen=True)
class TinyZImageConfig:
    dim: int = 64
    n_layers: int = 2
    n_refiner_layers: int = 1
    n_heads: int = 2  # head_dim = dim / n_heads must equal sum(axes_dims)
    axes_dims: tuple[int, int, int] = (8, 12, 12)
    in_channels: int = 4
    cap_feat_dim: int = 32
    downsample: int = 8  # pixels per latent cell, as Z-Image's VAE


def small_zimage(*, dim: int, n_layers: int, n_refiner_layers: int, n_heads: int, axes_dims, axes_lens,
                 in_channels: int, patch_size: int, cap_feat_dim: int):
    """diffusers' real ``ZImageTransformer2DModel`` at a small size, randomly initialised (the tiny
    test model here, the toy world's DiT in :mod:`.toy.model`)."""
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(patch_size,), all_f_patch_size=(1,), in_channels=in_channels, dim=dim, n_layers=n_layers,
        n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads, cap_feat_dim=cap_feat_dim,
        axes_dims=list(axes_dims), axes_lens=list(axes_lens),
    )


def tiny_zimage_backend(config: TinyZImageConfig = TinyZImageConfig(), seed: int = 0) -> DiffusersZImageBackend:
    torch.manual_seed(seed)
    transformer = small_zimage(
        dim=config.dim, n_layers=config.n_layers, n_refiner_layers=config.n_refiner_layers, n_heads=config.n_heads,
        axes_dims=config.axes_dims, axes_lens=(256, 64, 64), in_channels=config.in_channels, patch_size=2,
        cap_feat_dim=config.cap_feat_dim,
    )
    # Parameters that diffusers' init leaves all zero (its pad tokens; in other diffusers versions more, e.g. a final
    # layer) get small random values, so that outputs depend on every input and tests can see a difference.
    with torch.no_grad():
        for p in transformer.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    encoder = HashWordEncoder(config.cap_feat_dim, seed)
    latent = LatentSpec(config.in_channels, config.downsample)
    return DiffusersZImageBackend(transformer.eval(), encoder, latent, "z-image-tiny")
