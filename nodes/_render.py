"""Pictures the nodes show. Generic drawing lives in zerase_core.render; this adds the
ComfyUI-specific latent preview and VAE decode."""

from __future__ import annotations

import torch

from zerase_core.render import curves, grid, to_image, to_pil, word_map_rows  # noqa: F401  (re-exported for nodes)


def latent_preview(model, latent: torch.Tensor) -> torch.Tensor:
    """Cheap (B, H·8, W·8, 3) preview of latents through the model's latent→RGB factors (no VAE)."""
    fmt = model.model.latent_format
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32)  # (C, 3)
    bias = torch.tensor(getattr(fmt, "latent_rgb_factors_bias", None) or [0.0, 0.0, 0.0])
    rgb = torch.einsum("bchw,cr->bhwr", latent.float().cpu(), factors) + bias
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1).permute(0, 3, 1, 2)
    rgb = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")
    return rgb.permute(0, 2, 3, 1)


def decode(model, vae, latent: torch.Tensor) -> torch.Tensor:
    """Decode latents with the VAE when one is connected, else the cheap preview."""
    if vae is not None:
        return vae.decode(latent)[..., :3].float().cpu()
    return latent_preview(model, latent)
