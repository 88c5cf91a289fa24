"""Adapters between the engine and each Z-Image implementation (diffusers, ComfyUI, the toy)."""

from .base import Backend, HostSlot, LoRASet

__all__ = ["Backend", "HostSlot", "LoRASet"]
