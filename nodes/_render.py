"""Pictures the nodes show. Generic drawing lives in zerase_core.render; this adds the
ComfyUI-specific latent preview and VAE decode."""

from __future__ import annotations

import torch

from zerase_core.render import latent_rgb


def latent_preview(model, latent: torch.Tensor) -> torch.Tensor:
    """Cheap preview of a LATENT's samples (VAE space) through the model's latent→RGB factors (no VAE).

    The factors are fitted to the model's own latent space, the one the sampler works in (ComfyUI's sampling
    previews apply them to the sampler's x0): the samples go back into it first (for Z-Image, ×0.36 and shifted).
    """
    fmt = model.model.latent_format
    model_space = model.model.process_latent_in(latent.float().cpu())
    return latent_rgb(model_space, fmt.latent_rgb_factors, getattr(fmt, "latent_rgb_factors_bias", None),
                      upscale=fmt.spacial_downscale_ratio)


def decode(model, vae, latent: torch.Tensor) -> torch.Tensor:
    """Decode a LATENT's samples (VAE space) with the VAE when one is connected, else the cheap preview."""
    if vae is not None:
        return vae.decode(latent).cpu()  # render.to_pil, which every caller draws with, makes it RGB
    return latent_preview(model, latent)
