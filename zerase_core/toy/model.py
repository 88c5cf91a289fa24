"""The toy DiT: diffusers' real ZImageTransformer2DModel at a tiny size, and its latent space.

The "latent" is the RGB image itself in [-1, 1], pixel-unshuffled so the model sees a few
channels on a coarser grid (no VAE to train). Everything the engine relies on -- the
[image | caption] main-layer layout, the refiners, separate to_q/to_k/to_v, the x0 - eps
output -- is the real class's, so erasure behaves on the toy as on Z-Image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel

from ..backends.diffusers_zimage import zimage_forward
from ..tiny import small_zimage
from .world import IMAGE_SIZE


@dataclass(frozen=True)
class DiTConfig:
    """Tiny Z-Image sizes. head_dim = dim / n_heads must equal sum(axes_dims) (RoPE axes f, h, w)."""

    dim: int = 128
    n_layers: int = 4  # joint [image | caption] main layers: where the erasure LoRA goes
    n_refiner_layers: int = 1
    n_heads: int = 4
    axes_dims: tuple[int, int, int] = (8, 12, 12)
    axes_lens: tuple[int, int, int] = (64, 64, 64)  # caption + 1 must fit axes_lens[0]
    unshuffle: int = 2  # image pixels per latent cell along each side
    patch_size: int = 2  # latent cells per token along each side (the model's own patchify)
    cap_feat_dim: int = 64

    def __post_init__(self):
        if self.dim % self.n_heads or self.dim // self.n_heads != sum(self.axes_dims):
            raise ValueError(
                f"DiTConfig: head_dim {self.dim}/{self.n_heads} must equal sum(axes_dims) {self.axes_dims}")
        if IMAGE_SIZE % (self.unshuffle * self.patch_size):
            raise ValueError(f"DiTConfig: image size {IMAGE_SIZE} not divisible by unshuffle*patch_size")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent."""
        side = IMAGE_SIZE // self.unshuffle
        return 3 * self.unshuffle**2, side, side


def build_transformer(config: DiTConfig) -> ZImageTransformer2DModel:
    return small_zimage(
        dim=config.dim, n_layers=config.n_layers, n_refiner_layers=config.n_refiner_layers, n_heads=config.n_heads,
        axes_dims=config.axes_dims, axes_lens=config.axes_lens, in_channels=config.latent_shape[0],
        patch_size=config.patch_size, cap_feat_dim=config.cap_feat_dim,
    )


def to_latent(images: torch.Tensor, config: DiTConfig) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] -> (N, C, H/u, W/u) latents in [-1, 1]."""
    return F.pixel_unshuffle(images * 2.0 - 1.0, config.unshuffle)


def to_image(latents: torch.Tensor, config: DiTConfig) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, 3, H, W) images clamped to [0, 1]."""
    return ((F.pixel_shuffle(latents, config.unshuffle) + 1.0) / 2.0).clamp(0.0, 1.0)


def predict(
    transformer: ZImageTransformer2DModel, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor],
    patch_size: int,
) -> torch.Tensor:
    """The model's raw output (x0 - eps, i.e. minus the velocity) for a batch of (N, C, h, w) latents."""
    return zimage_forward(transformer, x, sigma, caps, patch_size=patch_size)


def config_metadata(config: DiTConfig) -> dict[str, str]:
    return {"dit_config": repr(asdict(config))}
