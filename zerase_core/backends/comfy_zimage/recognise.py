"""Whether a MODEL input is Z-Image, and what it is when it is not (for the refusal)."""

from __future__ import annotations

from typing import Any

from ...errors import ZEraseError


def describe_model(patcher: Any) -> str:
    """A short human name for what a MODEL input holds (for refusals)."""
    base = getattr(patcher, "model", None)
    config = getattr(base, "model_config", None)
    names = [type(config).__name__ if config is not None else None,
             type(getattr(base, "diffusion_model", None)).__name__ if base is not None else None]
    return " / ".join(n for n in names if n and n != "NoneType") or type(patcher).__name__


def check_zimage(patcher: Any, node: str = "Z-Erase") -> None:
    """Raise :class:`ZEraseError` unless ``patcher`` is a ModelPatcher holding Z-Image's NextDiT."""
    try:
        import comfy.ldm.lumina.model as lumina
        import comfy.supported_models as supported
    except ImportError as err:  # pragma: no cover - only outside ComfyUI
        raise ZEraseError(f"{node}: ComfyUI is not importable ({err}).") from err
    base = getattr(patcher, "model", None)
    dit = getattr(base, "diffusion_model", None)
    config = getattr(base, "model_config", None)
    unet = getattr(config, "unet_config", {}) or {}
    pixel_space = getattr(supported, "ZImagePixelSpace", ())  # a ComfyUI older than 2026-03 has no such variant
    ok = (
        type(dit) is lumina.NextDiT
        and isinstance(config, supported.ZImage)
        and not isinstance(config, pixel_space)
        and unet.get("z_image_modulation", False)
        and getattr(dit, "pad_tokens_multiple", None)
    )
    if not ok:
        raise ZEraseError(
            f"{node}: this MODEL is {describe_model(patcher)}, not Z-Image. Z-Erase works only on the "
            "single-stream Z-Image DiT (e.g. z_image_turbo_bf16.safetensors loaded with Load Diffusion Model); "
            "SDXL, Flux, plain Lumina 2 and other models are not supported."
        )
