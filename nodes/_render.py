"""Pictures the nodes show. Generic drawing lives in zerase_core.render; this adds the
ComfyUI-specific latent preview and VAE decode."""

from __future__ import annotations

import torch

from zerase_core.errors import ZEraseError
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


def check_vae(who: str, vae, channels: int) -> None:
    """A connected VAE that takes the model's latents, told before the node's work: another model's (SD's, 4
    channels) failed with torch's channel error only when it decoded, after Train had trained and the viewer had run
    its forwards."""
    found = getattr(vae, "latent_channels", None)  # ComfyUI's VAE says; anything else is left to its decode
    if vae is not None and found is not None and found != channels:
        raise ZEraseError(f"{who}: this VAE takes {found}-channel latents and Z-Image's have {channels}: connect "
                          "Z-Image's VAE (ae.safetensors), or leave vae unconnected for a cheap preview.")

